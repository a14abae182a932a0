"""What the CLIs share: argparse with one-line errors, the shared flags and their checks, and ``run_cli``,
the one place an exception becomes 'error: ...' and exit code 2."""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cdrl.utils import (
    MAX_MESSAGE,
    UsageError,
    describe_os_error,
    describe_out_of_memory,
    is_out_of_memory,
    one_line,
)

EXIT_BAD_INPUT = 2


# Bad input to a CLI: printed as one line 'error: ...', exit code 2, nothing half-written. The library
# raises the same type (and other ValueErrors); ``run_cli`` reports them all the same way.
CLIError = UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the CLIs: usage errors are CLIErrors (one line, exit code 2), flags must be spelt out
    in full (an abbreviation such as ``--guidance`` is an error, not a silent match), and a mistyped flag
    gets a suggestion."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise CLIError(f"{message}{self._suggestion(message)} (see --help)")

    def _suggestion(self, message: str) -> str:
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = list(self._option_string_actions)
        for token in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(token.split("=")[0], flags, n=1, cutoff=0.6)
            if token.startswith("-") and close:
                return f" (did you mean {close[0]}?)"
        return ""


def add_config_overrides(parser: argparse.ArgumentParser) -> None:
    """Add ``--set KEY=VALUE ...``: config overrides that accumulate over repeated flags (argparse's default
    would keep only the last ``--set``). Parsed into a list of strings for ``cdrl.config.load_config``."""
    parser.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys (repeatable: --set a=1 b=2 --set c=3)",
    )


def requested_classes(
    class_labels: Sequence[int] | None,
    all_classes: bool,
    guidance_scale: float,
    condition_sizes: Sequence[int],
    checkpoint: str | Path,
) -> list[int] | None:
    """The classes asked for by ``--class_labels`` / ``--all_classes``, checked against the checkpoint.

    Returns:
        The class ids, or None when neither flag was given (unconditional sampling).

    Raises:
        CLIError: guidance without a class, classes for an unconditional checkpoint, a label out of range.
    """
    if class_labels is None and not all_classes:
        if guidance_scale != 1.0:
            raise CLIError(
                "--guidance_scale needs --class_labels or --all_classes to guide towards"
            )
        return None
    flag = "--all_classes" if all_classes else "--class_labels"
    if not condition_sizes:
        raise CLIError(f"{flag} was given, but checkpoint {checkpoint} is unconditional")
    num_classes = condition_sizes[0]
    classes = list(range(num_classes)) if all_classes else list(class_labels)
    for label in classes:
        if not 0 <= label < num_classes:
            raise CLIError(f"class label {label} is outside [0, {num_classes}) for this checkpoint")
    return classes


def check_upper_bounds(args: argparse.Namespace, **limits: int) -> None:
    """Refuse a count flag above its limit (``cdrl.checks.MAX_SAMPLES`` ...): such a value would exhaust
    memory or run for days, and is far more likely a typo than a plan."""
    for name, limit in limits.items():
        value = getattr(args, name)
        if value is not None and value > limit:
            raise CLIError(f"--{name} must be at most {limit:,}, got {value:,}")


def check_finite(args: argparse.Namespace, *names: str) -> None:
    """Refuse nan and infinite values of float flags (argparse's float() accepts 'nan' and 'inf')."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise CLIError(f"--{name} must be a finite number, got {value}")


def run_cli(
    main: Callable[[Sequence[str] | None], int],
    argv: Sequence[str] | None = None,
    *,
    memory_hint: str = "use a smaller --batch_size",
    errors: tuple[type[BaseException], ...] = (),
    limit: int = MAX_MESSAGE,
) -> int:
    """Call ``main``; turn CLIError (and ValueError from the library) into 'error: ...' and exit code 2.

    An allocation failure (a batch too large for the machine) is reported the same way, with
    ``memory_hint``; ``errors`` adds exception types reported the same way (training's divergence); outputs are written only once complete (``cdrl.utils.atomic_write``), so nothing is half-written.
    """
    try:
        return main(argv)
    except (CLIError, ValueError, *errors) as err:
        message = str(err)
    except OSError as err:  # a path the system refuses: too long, a symlink loop, no permission
        message = describe_os_error(err)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        message = f"{describe_out_of_memory(err)}; {memory_hint}"
    print(f"error: {one_line(message, limit)}", file=sys.stderr)
    return EXIT_BAD_INPUT
