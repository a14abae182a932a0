"""Small helpers shared across the package (one copy of each)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

MAX_MESSAGE = 300  # characters of a one-line error message


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters with '...'."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_line(err: BaseException, *, named: bool = False) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors;
    ``named`` puts the type's name in front ("OSError: ...")."""
    text = str(err).strip()
    line = " ".join(text.splitlines()[0].split()) if text else ""
    if not line:
        return type(err).__name__
    return f"{type(err).__name__}: {line}" if named else line


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix (one line,
    cut to a sane length: a value or a path may be huge)."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class DataError(ValueError):
    """A data set that cannot be used; a one-line message naming the path/name and the fix."""


class UsageError(ValueError):
    """Bad input to a command or a function (a flag, an argument, an output path): one line, exit code 2
    from the CLIs."""


class CheckpointError(ValueError):
    """A checkpoint, run or exported pipeline folder that cannot be used; the message names the folder and
    the fix."""


def short_repr(value: object, limit: int = 60) -> str:
    """A value's repr for a message, cut to ``limit`` characters with '...'."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_path(path: str | Path, limit: int = 100) -> str:
    """A path for a message: its middle cut out when it is longer than ``limit`` characters."""
    text = str(path)
    half = (limit - 3) // 2
    return text if len(text) <= limit else f"{text[:half]}...{text[-half:]}"


def expand_as(values: Tensor, like: Tensor) -> Tensor:
    """(b,) -> (b, 1, ..., 1) so it broadcasts against ``like`` (b, ...)."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def randn_like(
    x: Tensor, generator: torch.Generator | list[torch.Generator] | None = None
) -> Tensor:
    """Standard normal noise shaped like ``x`` (diffusers' ``randn_tensor``).

    With a list of generators (one per sample, as EDM's StackedRandomGenerator), sample i draws only from
    generator i, so a sample does not depend on the batch it was drawn in.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if isinstance(generator, tuple):
        generator = list(generator)
    if isinstance(generator, list) and len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return randn_tensor(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)


def parse_int_list(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (EDM's seed syntax)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)-(\d+)", part)
        out.extend(range(int(match[1]), int(match[2]) + 1) if match else [int(part)])
    return out


def git_sha(cwd: str | Path | None = None) -> str:
    """The current commit, with '-dirty' when the tree has changes; 'unknown' outside a git checkout."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------------
# All-or-nothing writes: the one home of temp-and-rename.

# Written into every output folder we own; a folder without it is the user's.
OWNER_MARKER = ".cdrl-output"
_TMP, _OLD = "cdrl-tmp-", "cdrl-old-"


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (some file systems cannot fsync folders: skipped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_replace(path: str | Path) -> None:
    """Finish or undo a folder replace that a kill interrupted (``atomic_write``'s fallback path).

    Where ``path`` is missing and the old version waits under our aside name, it is moved back; leftover
    temporaries and asides of ours beside ``path`` are removed. Names are ours by construction (a hidden
    prefix, our tag and a random suffix), so nothing a user made is touched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    asides = sorted(path.parent.glob(f".{path.name}.{_OLD}*"))
    if asides and not os.path.lexists(path):
        asides.pop().rename(path)
    for leftover in [*asides, *path.parent.glob(f".{path.name}.{_TMP}*")]:
        _remove(leftover)


def is_owned_output(folder: str | Path) -> bool:
    """Whether ``folder`` is an output folder we wrote (it holds our marker file)."""
    return (Path(folder) / OWNER_MARKER).is_file()


@contextlib.contextmanager
def atomic_write(
    path: str | Path,
    *,
    folder: bool = False,
    durable: bool = False,
    temporary: str | Path | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` to write; on success it replaces ``path`` all at once.

    The temporary is a new file (or, with ``folder``, a new folder holding ``OWNER_MARKER``) under a name
    no one else uses, so no user file is ever overwritten or removed by the bookkeeping. A folder replaces
    an existing one by an atomic exchange where the OS has it (Linux), so the old or the new version is
    always at ``path``; elsewhere the old one is moved aside first and ``recover_replace`` restores it after
    a kill between the two renames. On an exception the temporary, and the parent folders made for it,
    are removed and ``path`` is left as it was. ``durable`` flushes the result to disk before returning.

    ``temporary`` (folders only) names the temporary instead of a random name, for several processes that
    write one folder together (a checkpoint): a hidden sibling of ``path`` that the caller owns; whatever
    is there from an interrupted write is removed first.
    """
    path = Path(path)
    made = [parent for parent in path.parents if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    if temporary is not None and not (
        folder and Path(temporary).parent == path.parent and Path(temporary).name.startswith(".")
    ):
        raise ValueError(f"temporary {temporary} must be a hidden sibling folder of {path}")
    if folder:
        recover_replace(path)
        if temporary is not None:
            tmp = Path(temporary)
            _remove(tmp)
            tmp.mkdir()
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_TMP}", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0o700
        (tmp / OWNER_MARKER).write_text("written by cdrl; this folder may be replaced by cdrl\n")
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_TMP}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o644)  # mkstemp makes it 0o600
    done = False
    try:
        yield tmp
        if durable:
            for file in tmp.rglob("*") if folder else [tmp]:
                if file.is_file():
                    fsync_path(file)
        if folder and path.is_dir() and not path.is_symlink():
            if not _exchange(tmp, path):  # fallback: move the old aside, then rename the new in
                aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_OLD}", dir=path.parent))
                os.replace(path, aside)
                os.replace(tmp, path)
                tmp = aside
        else:
            os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
        done = True
    finally:
        if os.path.lexists(tmp) and tmp != path:
            _remove(tmp)
        if not done:
            for parent in made:  # innermost first
                with contextlib.suppress(OSError):
                    parent.rmdir()


# ------------------------------------------------------------------------------------------------------
# One process at a time in a run folder.

RUN_LOCK = ".cdrl-run.lock"  # in a run folder while a process trains into it


class RunLockedError(ValueError):
    """Another process holds the run folder's lock."""


def lock_run_folder(folder: str | Path):
    """Take the run folder's exclusive lock for this process, or raise ``RunLockedError`` naming the holder.

    The lock is an OS file lock (flock) on ``RUN_LOCK`` in the folder, so it goes away with the process
    however it ends (a kill included); the file itself stays and is ours. Returns the open lock file:
    keep it open while training, close it to release. Where the OS has no flock (Windows), returns None.
    """
    try:
        import fcntl
    except ImportError:
        return None
    import socket

    handle = open(Path(folder) / RUN_LOCK, "a+")  # noqa: SIM115 (held open as the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(
            f"{folder} is in use: {holder} is training into it; wait for it to end or choose another "
            "--output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


# ---------------------------------------------------------------- errors from the system


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


# ---------------------------------------------------------------- outputs


def check_writable(path: str | Path) -> Path:
    """Fail early (before any work) when ``path`` could not be written; create nothing.

    The nearest folder above ``path`` that exists is probed with a temporary file (removed at once); the
    missing folders in between are made only when the output is written (``atomic_write``).
    """
    path = Path(path)
    existing = next((parent for parent in path.parents if parent.exists()), Path("."))
    if not existing.is_dir():
        raise UsageError(f"output {path} cannot be written: {existing} is a file, not a folder")
    probe = existing / f".cdrl-write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UsageError(f"output {path} cannot be written: {err.strerror or err}") from None
    return path


def check_output_folder(folder: Path, flag: str = "--output") -> None:
    """Refuse an existing folder unless it is empty or an output we wrote (it holds our marker).

    Any other folder is the user's: replacing it would delete their files, so it is never written.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file; give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()) and not is_owned_output(folder):
        raise UsageError(
            f"{flag} {folder} is a folder cdrl did not write (no {OWNER_MARKER} in it); "
            "give a new or empty folder"
        )
