"""What the CLIs share: loading a checkpoint, one-line errors with exit code 2, atomic outputs."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from cdrl.utils import OWNER_MARKER, atomic_write, is_owned_output, one_line, short_path

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """Bad input to a CLI: printed as one line 'error: ...', exit code 2, nothing half-written."""


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


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a failed allocation: MemoryError (Python, NumPy), torch.OutOfMemoryError (GPU),
    or a RuntimeError from torch's CPU allocator or from C++ (``std::bad_alloc``)."""
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("DefaultCPUAllocator" in text or "bad_alloc" in text)


def describe_out_of_memory(err: BaseException) -> str:
    """'out of memory (could not allocate 1.0 PiB)' from an allocation error."""
    match = re.search(r"allocate (\d+) bytes", str(err))
    if match:
        return f"out of memory (could not allocate {format_bytes(int(match[1]))})"
    match = re.search(r"allocate ([\d.]+ [KMGTPE]?i?B)", str(err))  # NumPy, CUDA
    return f"out of memory (could not allocate {match[1]})" if match else "out of memory"


def describe_os_error(err: OSError) -> str:
    """'cannot use PATH: File name too long' from an OSError (the path cut to a sane length)."""
    reason = err.strerror or type(err).__name__
    if err.filename is None:
        return f"{reason} ({one_line(str(err), 200)})"
    return f"cannot use {short_path(err.filename)}: {reason}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


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


def check_device(device: str | torch.device | None) -> None:
    """Refuse a --device that is not a torch device, or that this machine does not have, before any work."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CLIError(
            f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CLIError(
                f"--device {device}: this machine has no usable CUDA GPU; use --device cpu"
            )
        if parsed.index is not None and parsed.index >= count:
            raise CLIError(f"--device {device}: this machine has {count} CUDA GPU(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CLIError(f"--device {device}: cdrl runs on cpu, cuda or mps")


def resolve_checkpoint(path: str | Path) -> Path:
    """A pipeline folder (with model_index.json), or a run folder holding one in ``pipeline/``."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"checkpoint folder {path} does not exist")
    if (path / "model_index.json").is_file():
        folder = path
    elif (path / "pipeline" / "model_index.json").is_file():
        folder = path / "pipeline"
    else:
        raise CLIError(
            f"{path} holds no exported pipeline (model_index.json); pass a run's pipeline/ folder, "
            "or finish training so it is exported"
        )
    for part in ("ebm", "scheduler"):
        if not (folder / part).is_dir():
            raise CLIError(f"checkpoint {folder} is incomplete: the {part}/ folder is missing")
    return folder


def load_pipeline(path: str | Path, device: str | torch.device | None = None):
    """Load a ``CDRLPipeline`` from a checkpoint (see ``resolve_checkpoint``) onto ``device`` (default: cuda if any)."""
    from diffusers.utils import logging as diffusers_logging

    from cdrl.pipeline import CDRLPipeline

    folder = resolve_checkpoint(path)
    check_device(device)
    diffusers_logging.disable_progress_bar()  # keep stderr to notices and one-line errors
    try:
        pipeline = CDRLPipeline.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CLIError(
            f"checkpoint {folder} could not be loaded: {str(err).splitlines()[0]}"
        ) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipeline.to(device)
    except (RuntimeError, AssertionError) as err:
        raise CLIError(f"device {device!r} cannot be used: {str(err).splitlines()[0]}") from None
    return pipeline


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' 'Loading pipeline components' bar, so stderr holds only notices and one-line errors."""
    from diffusers.utils import logging as diffusers_logging

    enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            diffusers_logging.enable_progress_bar()


def check_writable(path: str | Path) -> Path:
    """Fail early (before any work) when ``path`` could not be written; create nothing.

    The nearest folder above ``path`` that exists is probed with a temporary file (removed at once); the
    missing folders in between are made only when the output is written (``atomic_path``).
    """
    path = Path(path)
    existing = next((parent for parent in path.parents if parent.exists()), Path("."))
    if not existing.is_dir():
        raise CLIError(f"output {path} cannot be written: {existing} is a file, not a folder")
    probe = existing / f".cdrl-write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise CLIError(f"output {path} cannot be written: {err.strerror or err}") from None
    return path


def atomic_path(
    path: str | Path, *, folder: bool = False
) -> contextlib.AbstractContextManager[Path]:
    """A temporary sibling to write a file (or, with ``folder``, a folder) into; it replaces ``path`` all
    at once on success and leaves everything as it was on an error (``cdrl.utils.atomic_write``)."""
    return atomic_write(path, folder=folder)


def check_output_folder(folder: Path, flag: str = "--output") -> None:
    """Refuse an existing folder unless it is empty or an output we wrote (it holds our marker).

    Any other folder is the user's: replacing it would delete their files, so it is never written.
    """
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"{flag} {folder} is a file; give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()) and not is_owned_output(folder):
        raise CLIError(
            f"{flag} {folder} is a folder cdrl did not write (no {OWNER_MARKER} in it); "
            "give a new or empty folder"
        )


def run_cli(
    main: Callable[[Sequence[str] | None], int],
    argv: Sequence[str] | None = None,
    *,
    memory_hint: str = "use a smaller --batch_size",
) -> int:
    """Call ``main``; turn CLIError (and ValueError from the library) into 'error: ...' and exit code 2.

    An allocation failure (a batch too large for the machine) is reported the same way, with
    ``memory_hint``; outputs are written only once complete (``atomic_path``), so nothing is half-written.
    """
    try:
        return main(argv)
    except (CLIError, ValueError) as err:
        message = str(err)
    except OSError as err:  # a path the system refuses: too long, a symlink loop, no permission
        message = describe_os_error(err)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        message = f"{describe_out_of_memory(err)}; {memory_hint}"
    print(f"error: {one_line(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT
