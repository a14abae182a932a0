"""The run folder: refusing a folder that is not ours, its files (config.yaml, git.txt, log.txt,
metrics.jsonl, guard events), the lock that keeps one process in it, and the sample grids."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from cdrl.config import Config, save_config
from cdrl.guidance import Conditioning, null_condition
from cdrl.images import save_grid, save_scatter
from cdrl.pipeline import CDRLPipeline
from cdrl.sampling import sample
from cdrl.utils import (
    RUN_LOCK,
    RunLockedError,
    UsageError,
    atomic_write,
    check_writable,
    git_sha,
    lock_run_folder,
)

# log.txt receives the records of every cdrl.training module (the loggers below this one).
LOGGER_NAME = "cdrl.training"
logger = get_logger(__name__)
# Warnings reach stderr through ``warn`` only (no logging.lastResort duplicates).
logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())
RUN_MARKER = "config.yaml"  # a folder holding this file (and checkpoints/metrics) is a cdrl run
METRICS = "metrics.jsonl"
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".del-")  # temporaries that a killed process leaves


def prepare_output_dir(output_dir: Path, resume: str | None) -> None:
    """Refuse a file, a folder that holds something other than a cdrl run, or a run without --resume."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output folder {output_dir} is a file; choose another --output_dir")
    check_writable(output_dir / RUN_MARKER)
    if not output_dir.exists() or not _entries(output_dir):
        return
    if not (output_dir / RUN_MARKER).is_file():
        raise UsageError(
            f"output folder {output_dir} exists and is not a cdrl run; choose another --output_dir or empty it"
        )
    if resume is None:
        raise UsageError(
            f"output folder {output_dir} already holds a run; pass --resume_from_checkpoint latest to continue"
            " it, or choose another --output_dir"
        )


def _entries(folder: Path) -> list[Path]:
    """The folder's entries, leaving out our own temporaries (a killed run can leave them) and lock."""
    return [
        p
        for p in folder.iterdir()
        if not p.name.startswith(LEFTOVER_PREFIXES) and p.name != RUN_LOCK
    ]


COMMAND_FILE = "command.txt"  # the command line of each start of the run, one per line


def start_run_files(
    cfg: Config,
    accelerator: Accelerator,
    output_dir: Path,
    resume_step: int | None,
    command: str | None = None,
) -> logging.Handler | None:
    """Create the run's files once its first step has worked, so that bad input leaves nothing behind.

    config.yaml (the run marker, written atomically) first, then git.txt and the log file. On a resume,
    metrics logged after the checkpoint (by the run that stopped) are dropped, so that metrics.jsonl
    describes the trajectory the checkpoint continues.
    """
    if not accelerator.is_main_process:
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    hold_run_lock(output_dir)  # a new folder: taken now, before anything is written into it
    _STARTED.add(output_dir.resolve())
    save_config(cfg, output_dir / RUN_MARKER)
    (output_dir / "git.txt").write_text(git_sha() + "\n")
    if command:  # appended: a resumed run keeps the commands of its earlier starts
        with open(output_dir / COMMAND_FILE, "a") as file:
            file.write(command + "\n")
    if resume_step is not None:
        truncate_metrics(output_dir / METRICS, resume_step)
    handler = logging.FileHandler(output_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    logging.getLogger(LOGGER_NAME).setLevel(logging.INFO)
    return handler


def run_command(output_dir: Path) -> str | None:
    """The command line that first started a run (``COMMAND_FILE``), or None when it was not recorded."""
    path = output_dir / COMMAND_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return lines[0] if lines and lines[0].strip() else None


def stop_log_file(handler: logging.Handler | None) -> None:
    """Detach and close the log.txt handler of ``start_run_files``."""
    if handler is not None:
        logging.getLogger(LOGGER_NAME).removeHandler(handler)
        handler.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to ``step`` (and drop a line cut short by a kill), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    with atomic_write(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def warn(accelerator: Accelerator, message: str) -> None:
    """A warning on stderr (main process) and in log.txt."""
    if accelerator.is_main_process:
        tqdm.write(f"warning: {message}", file=sys.stderr)
    logger.warning(message)


def say(message: str) -> None:
    """A stage of the run's end on the console (above the progress bar) and in log.txt."""
    tqdm.write(message)
    logger.info(message)


def log_event(accelerator: Accelerator, output_dir: Path, event: dict[str, Any]) -> None:
    """A guard event as a line of metrics.jsonl (it has an "event" key) and of log.txt."""
    if accelerator.is_main_process:
        _append_jsonl(output_dir / METRICS, event)
    logger.info(json.dumps(event))


def log_metrics(
    accelerator: Accelerator, output_dir: Path, record: dict[str, Any], bar: tqdm
) -> None:
    """One line of metrics.jsonl, the trackers, log.txt and the progress bar's summary."""
    if accelerator.is_main_process:
        _append_jsonl(output_dir / METRICS, record)
        bar.set_postfix(
            gap=f"{record.get('ebm/energy_gap', float('nan')):.3g}",
            loss=f"{record.get('ebm/loss', float('nan')):.3g}",
        )
    accelerator.log(record, step=record["step"])
    logger.info(json.dumps(record))


def summarize(sums: dict[str, Tensor], n: int) -> dict[str, float]:
    """Means over the logging interval; per-level sums become per-level means (``level{k}/name``)."""
    counts = sums["level/count"].clamp(min=1)
    record = {}
    for key, value in sums.items():
        if key == "level/count":
            continue
        if key.startswith("level/"):
            name = key.split("/", 1)[1]
            record.update(
                {f"level{k}/{name}": round(v, 6) for k, v in enumerate((value / counts).tolist())}
            )
        else:
            record[key] = round(value.item() / n, 6)
    return record


# ----------------------------------------------------------------------------------------------------------
# One process at a time in a run folder.

_STARTED: set[Path] = set()  # run folders this process has begun writing into
# run folder -> (the open lock file, the lock file's text and times before, or None if this run made it)
_RUN_LOCKS: dict[Path, tuple[Any, tuple[str, int, int] | None]] = {}


def hold_run_lock(output_dir: Path) -> None:
    """Take ``output_dir``'s lock for this process (once; ``release_run_lock`` releases it)."""
    key, path = output_dir.resolve(), output_dir / RUN_LOCK
    if key not in _RUN_LOCKS:
        before = None
        if path.is_file():
            before = (path.read_text(), path.stat().st_atime_ns, path.stat().st_mtime_ns)
        try:
            _RUN_LOCKS[key] = (lock_run_folder(output_dir), before)
        except RunLockedError as err:
            raise UsageError(str(err)) from None


def release_run_lock(output_dir: Path) -> None:
    """Release the lock; a run refused before it wrote anything leaves the lock file as it found it."""
    key, path = output_dir.resolve(), output_dir / RUN_LOCK
    handle, before = _RUN_LOCKS.pop(key, (None, None))
    if handle is not None and key not in _STARTED:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(before[0])
            os.utime(path, ns=before[1:])
    _STARTED.discard(key)
    if handle is not None:
        handle.close()


# ----------------------------------------------------------------------------------------------------------
# Sample grids.


def save_samples(
    pipeline: CDRLPipeline, x_top: Tensor, cond: Tensor | None, folder: Path, step: int
) -> list[Path]:
    """Grids of the initializer-only chain (K = 0) and the refined chain, from fixed noise; their PNGs."""
    schedule, settings = pipeline.scheduler.schedule, pipeline.scheduler.langevin_settings()
    conditioning = None
    if cond is not None:
        null = null_condition(pipeline.condition_sizes, cond.shape[0], cond.device)
        conditioning = Conditioning(null=null, terms=((cond, 1.0),))
    kinds = {"refined": settings}
    if pipeline.initializer is not None:
        kinds["init"] = dataclasses.replace(settings, n_steps=0)
    paths = []
    for name, kind_settings in kinds.items():
        x = sample(
            pipeline.ebm,
            pipeline.initializer,
            schedule,
            x_top,
            kind_settings,
            cond=conditioning,
            generator=torch.Generator().manual_seed(0),
        )
        path = folder / f"{step:07d}_{name}.png"
        x = x / pipeline.scheduler.config.data_scale
        if x.dim() == 2:
            save_scatter(x, path)
        else:
            nrow = pipeline.condition_sizes[0] if cond is not None else None
            save_grid(x, path, nrow=nrow, upscale=max(1, 64 // x.shape[-1]))
        paths.append(path)
    return paths


def log_images(accelerator: Accelerator, paths: list[Path], step: int) -> None:
    """The sample grids (PNG files) as images of the run's trackers: tensorboard's ``add_image``, wandb's
    ``wandb.Image``, under ``samples/<kind>`` (init, refined). Main process only; no tracker, nothing."""
    if not paths or not accelerator.trackers:
        return
    images = {f"samples/{path.stem.split('_', 1)[1]}": path for path in paths}
    for (
        tracker
    ) in accelerator.trackers:  # as diffusers' training examples log their validation images
        if tracker.name == "tensorboard":
            for tag, path in images.items():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                tracker.writer.add_image(tag, pixels, step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(str(path)) for tag, path in images.items()}, step=step)


# The model card's figures: the last logged record's means, without per-level, learning-rate and timing keys.
FIGURE_PREFIXES = ("ebm/", "init/", "langevin/", "persistent/", "guard/")


def export_figures(output_dir: Path, step: int | None = None) -> dict[str, float]:
    """The main figures of the last metrics.jsonl record (up to ``step``, when given): loss, energy gap,
    initializer MSE, gradient norms, guard counters, named as logged, for the exported model card; {}
    when nothing was logged. Reads the file only."""
    path = output_dir / METRICS
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if not isinstance(record, dict) or "event" in record:
            continue
        if step is None or record.get("step", 0) <= step:
            return {
                key: float(value)
                for key, value in record.items()
                if key.startswith(FIGURE_PREFIXES) and isinstance(value, int | float)
            }
    return {}
