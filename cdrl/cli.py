"""What the inference CLIs share: loading a checkpoint, one-line errors with exit code 2, atomic outputs."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """Bad input to a CLI: printed as one line 'error: ...', exit code 2, nothing half-written."""


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
    """Fail early (before any work) when ``path``'s parent folder cannot be created or written.

    Only the parent is probed (and created), so ``path`` itself does not appear before the work is done.
    """
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".cdrl-write-test-{id(path)}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise CLIError(f"output {path} cannot be written: {err.strerror or err}") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or folder into; rename it into place on success.

    On an exception the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        tmp.replace(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; turn CLIError (and ValueError from the library) into 'error: ...' and exit code 2."""
    try:
        return main(argv)
    except (CLIError, ValueError) as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
