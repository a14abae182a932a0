"""Training: ``accelerate launch train.py --config configs/digits.yaml [--set key=value ...] [flags]``.

One function per concern: ``train_step`` (one cooperative update behind a divergence guard, testable
alone) and ``run`` (the loop: data, models, crash-safe checkpoints and rollbacks, logs, grids, export).
Distribution, mixed precision and checkpoint state are accelerate's job; bad input stops with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from accelerate.utils import load as accelerate_load
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from cdrl import precision as prec
from cdrl.calibration import calibrate_on_dataset
from cdrl.cli.common import ArgumentParser, CLIError, add_config_overrides
from cdrl.config import (
    DEFAULT_RECIPE,
    Config,
    ConfigError,
    config_path,
    flat,
    load_config,
    recipe_names,
    save_config,
)
from cdrl.curves import CURVES_FILE, plot_curves
from cdrl.data import DataError, load_dataset
from cdrl.export import export_pipeline
from cdrl.images import save_grid, save_scatter
from cdrl.langevin import langevin_refine
from cdrl.losses import ebm_loss, initializer_loss
from cdrl.models import EnergyMLP, EnergyResNet, InitializerMLP, InitializerUNet
from cdrl.persistent import PersistentChains
from cdrl.pipeline import CDRLPipeline, CDRLScheduler, weights_mismatch
from cdrl.sampling import energy_fn, frozen, level, sample
from cdrl.schedule import NoiseSchedule
from cdrl.utils import (
    RUN_LOCK,
    RunLockedError,
    atomic_write,
    check_writable,
    describe_out_of_memory,
    error_line,
    expand_as,
    fsync_path,
    git_sha,
    is_out_of_memory,
    lock_run_folder,
)

logger = get_logger(__name__)
# Warnings reach stderr through _warn only (no logging.lastResort duplicates).
logging.getLogger(__name__).addHandler(logging.NullHandler())
RUN_MARKER = "config.yaml"  # a folder holding this file (and checkpoints/metrics) is a cdrl run
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
# Written last into a checkpoint: its step, guard counters, EMA settings, and every file with its size.
CHECKPOINT_MARKER = "checkpoint.json"
EMA_WEIGHTS = "ema.safetensors"  # the EMA shadow weights of a checkpoint
# The pickled EMAs of checkpoints written before checkpoint.json (read with weights_only=True).
LEGACY_EMA_RE = re.compile(r"custom_checkpoint_(\d+)\.pkl")
LEGACY_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".del-")  # temporaries that a killed process leaves


class UsageError(ValueError):
    """A problem with the command line or the output folder; reported in one line, exit code 2."""


class DivergenceError(FloatingPointError):
    """Training diverged and the guard could not recover; reported in one line, exit code 2."""


class Models(NamedTuple):
    ebm: nn.Module  # prepared (possibly DDP-wrapped)
    initializer: nn.Module | None
    ebm_opt: torch.optim.Optimizer
    init_opt: torch.optim.Optimizer | None
    ebm_sched: Any
    init_sched: Any
    # persistent negatives at the lowest levels (train.persistent_*), or None
    chains: PersistentChains | None = None


class StepResult(NamedTuple):
    stats: dict[str, Tensor]  # detached; complete only for an applied step
    problem: str | None  # why the step was not applied (divergence guard), or None


@dataclass
class GuardState:
    """The divergence guard's counters; saved in every checkpoint's checkpoint.json."""

    skipped: int = 0  # bad steps so far (on every trajectory, rollbacks included)
    streak: int = 0  # bad steps in a row, up to the current step
    rollbacks: int = 0  # so far; the learning rates are scaled by guard.lr_factor ** rollbacks


# ----------------------------------------------------------------------------------------------------------
# Models.


def build_models(cfg: Config, sample_shape: tuple[int, ...], condition_sizes: tuple[int, ...]):
    """The EBM and the initializer (None for DRL) for data of ``sample_shape``."""
    e, i = cfg.ebm, cfg.initializer
    conds = tuple(condition_sizes)
    if len(sample_shape) == 1:
        if e.arch != "mlp" or i.arch not in ("mlp", "none"):
            raise ConfigError("vector data needs ebm.arch=mlp and initializer.arch=mlp (or none)")
        ebm = EnergyMLP(
            in_features=sample_shape[0], hidden=e.hidden, channel_mult=tuple(e.channel_mult),
            num_res_blocks=e.num_res_blocks, spectral_norm=e.spectral_norm, condition_sizes=conds,
        )  # fmt: skip
        init = None if i.arch == "none" else InitializerMLP(
            in_features=sample_shape[0], hidden=i.hidden, num_blocks=i.num_blocks,
            norm_num_groups=min(i.norm_num_groups, i.hidden), condition_sizes=conds,
        )  # fmt: skip
        return ebm, init
    if e.arch != "resnet" or i.arch not in ("unet", "none"):
        raise ConfigError("image data needs ebm.arch=resnet and initializer.arch=unet (or none)")
    channels, size = sample_shape[0], sample_shape[1]
    if size % 2 ** (len(e.channel_mult) - 1) or size % 2 ** (len(i.block_out_channels) - 1):
        raise ConfigError(
            f"image size {size} is not divisible by the networks' downsampling; change channel_mult"
        )
    ebm = EnergyResNet(
        in_channels=channels, sample_size=size, base_channels=e.base_channels,
        channel_mult=tuple(e.channel_mult), num_res_blocks=e.num_res_blocks,
        spectral_norm=e.spectral_norm, condition_sizes=conds,
    )  # fmt: skip
    init = None if i.arch == "none" else InitializerUNet(
        in_channels=channels, sample_size=size, block_out_channels=tuple(i.block_out_channels),
        attention_levels=tuple(i.attention_levels), layers_per_block=i.layers_per_block,
        dropout=i.dropout, norm_num_groups=i.norm_num_groups, attention_head_dim=i.attention_head_dim,
        condition_sizes=conds,
    )  # fmt: skip
    return ebm, init


# ----------------------------------------------------------------------------------------------------------
# One training step.


def lr_schedule(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    """Linear warmup, then constant, cosine or linear decay to 0 at ``total`` (diffusers' ``get_scheduler``)."""
    name = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total, warmup + 1)
    )


def drop_conditions(cond: Tensor, sizes: Sequence[int], prob: float) -> Tensor:
    """Replace each condition by its null token with probability ``prob`` (classifier-free guidance training)."""
    null = torch.tensor(list(sizes), device=cond.device).expand_as(cond)
    drop = torch.rand(cond.shape, device=cond.device) < prob
    return torch.where(drop, null, cond)


def train_step(
    models: Models,
    batch: tuple[Tensor, Tensor],
    cfg: Config,
    schedule: NoiseSchedule,
    accelerator: Accelerator,
    condition_sizes: Sequence[int] = (),
) -> StepResult:
    """One cooperative update of the EBM and the initializer (CDRL Alg. 1), unless the guard refuses it.

    The divergence guard applies no update when the energies or either loss are non-finite, when the
    energy gap |mean E(y-) - E(y+)| exceeds ``guard.max_energy_gap``, or when the EBM's gradients are
    non-finite. The initializer's backward runs after the EBM's update (fp16 loss scaling needs one
    update between two unscales), so non-finite initializer gradients after finite losses skip only the
    initializer's update. Under fp16 loss scaling, non-finite gradients are GradScaler's to handle: it
    skips the update and lowers its scale.

    Returns:
        The detached stats, and the reason the step was not applied (None when it was).
    """
    x0, cond = batch
    x0 = x0 * cfg.data.scale
    b, T = x0.shape[0], schedule.num_levels
    cond = drop_conditions(cond, condition_sizes, cfg.data.uncond_prob) if condition_sizes else None

    # Draw a level per example and the pair (x_t, x_{t+1}) from q (CDRL Alg. 1, line 3; App. A.3).
    t = torch.randint(0, T, (b,), device=x0.device)
    x_t, x_next = schedule.q_pair(x0, t, variance_reduction=cfg.train.variance_reduction)
    lvl = level(schedule, t, cfg.langevin)
    scale = expand_as(lvl.scale, x0)
    y_pos = scale * x_t

    # Propose y with the initializer (gradient flows through its mean only) (CDRL Eq. (8)).
    init, ebm = models.initializer, models.ebm
    if init is not None:
        init.train()
        mean = init(x_next, lvl.next_noise_level, cond)
        y_init = mean + expand_as(lvl.proposal_std, mean) * torch.randn_like(mean)
    else:
        mean, y_init = None, x_next

    # Refine with K Langevin steps under the unwrapped EBM: eval mode, frozen, fp32 state (CDRL Alg. 1, line 5).
    ebm_raw = accelerator.unwrap_model(ebm)
    # bf16: the forwards run under autocast, the chain state and its gradient stay float32. fp16 stays
    # float32: the tempered energy's backward is scaled by 1 / s_0^2 = 4e4 and would overflow.
    langevin_dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None

    def refine(y: Tensor, x_tether: Tensor, t_chain: Tensor, c: Tensor | None) -> Tensor:
        """K Langevin steps from y of the recovery conditionals at levels t_chain, tethered to x_tether."""
        lv = lvl if t_chain is t else level(schedule, t_chain, cfg.langevin)  # the batch: lvl as is
        with frozen(ebm_raw):
            fn = prec.autocast_energy_fn(energy_fn(ebm_raw, lv, null=c), langevin_dtype)
            return langevin_refine(fn, y, x_tether, sigma=lv.sigma, tether=lv.tether,
                                   step_size=lv.step_size, n_steps=cfg.langevin.n_steps,
                                   noise=cfg.langevin.noise)  # fmt: skip

    y_neg = refine(y_init.detach(), x_next, t, cond)
    # At the lowest levels some of the EBM's negatives continue persistent chains (cdrl.persistent).
    y_ebm_neg = y_neg
    if models.chains is not None:
        y_ebm_neg, continued = models.chains.negatives(t, y_neg, x_next, cond, refine)

    # Energies of positives and refined negatives in one forward; both losses (DRL Eq. (8), CDRL Eq. (9)).
    ebm.train()
    both_cond = None if cond is None else torch.cat([cond, cond])
    energies = ebm(
        torch.cat([y_pos, y_ebm_neg]), torch.cat([lvl.noise_level, lvl.noise_level]), both_cond
    ).float()
    energy_pos, energy_neg = energies.chunk(2)
    loss, stats = ebm_loss(energy_pos, energy_neg, lvl.loss_weight)
    stats["ebm/loss"] = loss.detach()
    losses = {"EBM": loss}
    if init is not None:
        # The data term's target: under shared noise only the posterior mean is E[y | x_{t+1}, x_0].
        y_data = y_pos
        if cfg.train.init_data_target == "posterior_mean":
            y_data = scale * schedule.posterior_mean(x0, x_next, t)
        init_loss, init_stats = initializer_loss(
            y_init, y_neg, mean=mean, y_data=y_data, data_weight=cfg.train.init_data_weight
        )
        stats.update(init_stats)
        losses["initializer"] = init_loss

    # Divergence guard: apply nothing on non-finite energies or losses, or an exploded energy gap.
    problem = value_problem(energy_pos, energy_neg, losses, cfg.guard.max_energy_gap, accelerator)
    if problem is not None:
        return StepResult(stats, problem)

    # Update the EBM on positives and refined negatives (DRL Eq. (8)), unless its gradients are non-finite.
    models.ebm_opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    stats["ebm/grad_norm"] = _as_tensor(
        accelerator.clip_grad_norm_(ebm.parameters(), cfg.train.grad_clip)
    )
    problem = gradient_problem(stats["ebm/grad_norm"], "EBM", accelerator)
    if problem is not None:
        models.ebm_opt.zero_grad(set_to_none=True)
        return StepResult(stats, problem)
    models.ebm_opt.step()
    models.ebm_sched.step()

    # Update the initializer towards the refined samples: cooperative learning (CDRL Eq. (9)).
    if init is not None:
        models.init_opt.zero_grad(set_to_none=True)
        accelerator.backward(losses["initializer"])
        stats["init/grad_norm"] = _as_tensor(
            accelerator.clip_grad_norm_(init.parameters(), cfg.train.grad_clip)
        )
        problem = gradient_problem(stats["init/grad_norm"], "initializer", accelerator)
        if problem is not None:
            models.init_opt.zero_grad(set_to_none=True)
            return StepResult(stats, f"{problem} (only the EBM's update was applied)")
        models.init_opt.step()
        models.init_sched.step()

    # Diagnostics per level: energy gap E(y-) - E(y+) and how far Langevin moved / how noisy y- still is.
    with torch.no_grad():
        gap = (energy_neg - energy_pos).detach()
        move = (y_neg - y_init.detach()).flatten(1).norm(dim=1)
        # RMS distance of y- from the true y+.
        err = (y_neg - y_pos).flatten(1).pow(2).mean(dim=1).sqrt()
        stats["level/count"] = torch.zeros(T, device=x0.device).index_add_(
            0, t, torch.ones_like(gap)
        )
        for name, values in (("gap", gap), ("move", move), ("rms_err", err)):
            stats[f"level/{name}"] = torch.zeros(T, device=x0.device).index_add_(0, t, values)
        stats["langevin/move_norm"] = move.mean()
        if models.chains is not None:
            stats["persistent/share"] = continued.float().mean()
            # the largest |y| among the continued chains: chains that run off show up here first
            stats["persistent/max_abs"] = (y_ebm_neg.flatten(1).abs().amax(1) * continued).amax()
    return StepResult(stats, None)


def value_problem(
    energy_pos: Tensor,
    energy_neg: Tensor,
    losses: dict[str, Tensor],
    max_energy_gap: float,
    accelerator: Accelerator,
) -> str | None:
    """Why a step must not be applied, judged on its energies and losses (agreed by all processes), or None.

    Args:
        energy_pos, energy_neg: (b,) E(y+) and E(y-).
        losses: scalar losses by network name.
        max_energy_gap: bound on |mean E(y-) - E(y+)| (``guard.max_energy_gap``).
        accelerator: reduces the verdict over processes, so that every process skips the same steps.
    """
    gap = (energy_neg - energy_pos).mean()
    checks = {
        "non-finite EBM energies": ~torch.isfinite(torch.cat([energy_pos, energy_neg])).all(),
        **{f"non-finite {name} loss": ~torch.isfinite(value) for name, value in losses.items()},
        f"energy gap beyond guard.max_energy_gap={max_energy_gap:g}": gap.abs() > max_energy_gap,
    }
    bad = torch.stack(list(checks.values())).float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    reasons = [name for name, flag in zip(checks, bad.tolist(), strict=True) if flag > 0]
    if not reasons:
        return None
    values = (
        f"E(y+) mean {energy_pos.mean().item():.4g}, E(y-) mean {energy_neg.mean().item():.4g}, "
        f"gap {gap.item():.4g}"
    )
    return f"{'; '.join(reasons)} ({values})"


def gradient_problem(grad_norm: Tensor, name: str, accelerator: Accelerator) -> str | None:
    """'non-finite EBM gradients (norm nan)' when the gradient norm is not finite, else None.

    Gradients are already reduced over processes, so every process agrees. Under fp16 loss scaling an
    overflow is GradScaler's to handle (it skips the update and lowers the scale): None.
    """
    if accelerator.scaler is not None or bool(torch.isfinite(grad_norm)):
        return None
    return f"non-finite {name} gradients (norm {grad_norm.item():.4g})"


def _as_tensor(value: Any) -> Tensor:
    return value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))


# ----------------------------------------------------------------------------------------------------------
# Run directory.


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


def start_run_files(
    cfg: Config, accelerator: Accelerator, output_dir: Path, resume_step: int | None
) -> logging.Handler | None:
    """Create the run's files once its first step has worked, so that bad input leaves nothing behind.

    config.yaml (the run marker, written atomically) first, then git.txt and the log file. On a resume,
    metrics logged after the checkpoint (by the run that stopped) are dropped, so that metrics.jsonl
    describes the trajectory the checkpoint continues.
    """
    if not accelerator.is_main_process:
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    _hold_run_lock(output_dir)  # a new folder: taken now, before anything is written into it
    _STARTED.add(output_dir.resolve())
    save_config(cfg, output_dir / RUN_MARKER)
    (output_dir / "git.txt").write_text(git_sha() + "\n")
    if resume_step is not None:
        truncate_metrics(output_dir / "metrics.jsonl", resume_step)
    handler = logging.FileHandler(output_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger(__name__).addHandler(handler)
    logging.getLogger(__name__).setLevel(logging.INFO)
    return handler


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


def _warn(accelerator: Accelerator, message: str) -> None:
    """A warning on stderr (main process) and in log.txt."""
    if accelerator.is_main_process:
        tqdm.write(f"warning: {message}", file=sys.stderr)
    logger.warning(message)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: crash-safe writing, completeness, safe loading.


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (checkpoint-N folders that pass ``checkpoint_problem``), oldest first."""
    return [
        (step, path)
        for step, path in _checkpoint_folders(output_dir)
        if not checkpoint_problem(path)
    ]


def _checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in output_dir.glob("checkpoint-*"):
        match = CHECKPOINT_RE.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match[1]), path))
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed (it was not completely written), or None.

    A complete checkpoint holds checkpoint.json, written last, listing every file and its size. A
    checkpoint from before checkpoint.json is accepted when it holds accelerate's files and its EMAs.
    """
    marker = path / CHECKPOINT_MARKER
    if not marker.is_file():
        legacy = [name for name in LEGACY_FILES if not (path / name).is_file()]
        if not legacy and any(LEGACY_EMA_RE.fullmatch(p.name) for p in path.iterdir()):
            return None
        return f"it has no {CHECKPOINT_MARKER} (it was not completely written)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {CHECKPOINT_MARKER} is unreadable"
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return f"its file {name} is missing or truncated"
    return None


def resolve_resume(output_dir: Path, resume: str | None) -> tuple[int, Path | None, list[str]]:
    """(step, folder, warnings) to resume from: 'latest', a checkpoint folder, or None (fresh start).

    'latest' skips incomplete checkpoints (newer than the newest complete one) and names them in the
    warnings; an explicitly named incomplete checkpoint is an error.
    """
    if resume is None:
        return 0, None, []
    if resume == "latest":
        complete = list_checkpoints(output_dir)
        newest = complete[-1][0] if complete else -1
        warnings = [
            f"skipping {path}: {checkpoint_problem(path)}"
            for step, path in _checkpoint_folders(output_dir)
            if step > newest and checkpoint_problem(path)
        ]
        if not complete:
            if warnings:
                warnings.append("no complete checkpoint: starting from step 0")
            return 0, None, warnings
        return *complete[-1], warnings
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume
    match = CHECKPOINT_RE.fullmatch(path.name)
    if not path.is_dir() or not match:
        raise UsageError(
            f"--resume_from_checkpoint {resume}: no checkpoint-N folder there; use 'latest'"
        )
    problem = checkpoint_problem(path)
    if problem:
        raise UsageError(f"--resume_from_checkpoint {resume}: {problem}; use 'latest'")
    return int(match[1]), path, []


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    limit: int | None,
    ema: dict[str, EMAModel],
    guard: GuardState,
    chains: PersistentChains | None = None,
) -> Path:
    """accelerator.save_state, the EMAs and the persistent chains into checkpoint-N, crash-safe.

    Everything goes into .tmp-checkpoint-N, is flushed to disk, is described by checkpoint.json (written
    last), and is renamed into place; an existing checkpoint-N is moved aside first and deleted after, as
    are checkpoints beyond ``limit``. A kill at any moment leaves every earlier checkpoint intact.
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        _remove_leftovers(output_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # models (safetensors), optimizers, schedulers, RNG states
    if chains is not None:  # every process keeps its own chains
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(chains.state_dict(), str(tmp / chains_file(accelerator.process_index)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tensors, ema_info = _ema_state(ema)
        save_file(tensors, str(tmp / EMA_WEIGHTS))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        for name in files:
            fsync_path(tmp / name)
        marker = {"step": step, "guard": dataclasses.asdict(guard), "ema": ema_info, "files": files}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        fsync_path(tmp / CHECKPOINT_MARKER)
        if final.exists():
            final.rename(output_dir / f".old-{final.name}")
        tmp.rename(final)
        fsync_path(output_dir)
        _remove_leftovers(output_dir)
        if limit is not None:
            for _, old in list_checkpoints(output_dir)[:-limit]:
                # A rename is atomic: no checkpoint-N is ever half deleted.
                old.rename(old.with_name(f".del-{old.name}"))
            _remove_leftovers(output_dir)
    accelerator.wait_for_everyone()
    return final


def chains_file(process_index: int) -> str:
    """The checkpoint file holding one process's persistent chains."""
    return f"persistent_chains_{process_index}.safetensors"


def _remove_leftovers(output_dir: Path) -> None:
    """Delete checkpoint temporaries (.tmp-, .old-, .del-checkpoint-N) that a killed process left."""
    for path in output_dir.glob(".*-checkpoint-*"):
        if path.name.startswith(LEFTOVER_PREFIXES) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    accelerator: Accelerator, path: Path, models: Models, ema: dict[str, EMAModel]
) -> GuardState:
    """Restore models, optimizers, schedulers, RNG states and EMAs from a checkpoint folder, safely.

    Weights come from safetensors; accelerate's pickles (optimizer, scheduler, RNG states) are opened with
    ``torch.load(weights_only=True)`` first, so that one holding anything but plain data is refused before
    accelerate reads it. The networks must match the weights (same config).

    Returns:
        The guard counters stored with the checkpoint (zeros for a checkpoint from before them).

    Raises:
        UsageError: a checkpoint that does not match the networks, or that cannot be read safely.
    """
    networks = [models.ebm] + ([models.initializer] if models.initializer is not None else [])
    names = ["ebm", "initializer"][: len(networks)]
    stored = sorted(p.name for p in path.glob("model*.safetensors"))
    expected = ["model.safetensors"] + [f"model_{i}.safetensors" for i in range(1, len(networks))]
    if stored != expected:
        raise UsageError(
            f"checkpoint {path} holds {len(stored)} networks ({', '.join(stored) or 'none'}) but this "
            f"config builds {len(networks)} ({' and '.join(names)}); resume with the run's config.yaml"
        )
    for name, network, file in zip(names, networks, expected, strict=True):
        problem = weights_mismatch(accelerator.unwrap_model(network).state_dict(), path / file)
        if problem is not None:
            raise UsageError(
                f"checkpoint {path} does not match this config: {file} ({name}): {problem}; resume "
                "with the settings of the run's config.yaml"
            )
    for file in sorted([*path.glob("*.bin"), *path.glob("*.pkl")]):
        try:
            accelerate_load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as err:
            reason = re.search(
                r"WeightsUnpickler error: ([^\n]*?)( was not an allowed|\n|$)", str(err)
            )
            detail = reason[1] if reason else error_line(err)
            raise UsageError(
                f"checkpoint file {file} was refused: it holds more than tensors and plain numbers "
                f"(torch.load(weights_only=True): {detail}); it was not loaded"
            ) from None
    marker = path / CHECKPOINT_MARKER
    try:
        if marker.is_file():
            info = json.loads(marker.read_text())
            accelerator.load_state(str(path))
            _load_ema(ema, load_file(str(path / EMA_WEIGHTS)), info["ema"], accelerator.device)
            if models.chains is not None:  # a checkpoint without chains restarts them empty
                file = path / chains_file(accelerator.process_index)
                models.chains.load_state_dict(load_file(str(file)) if file.is_file() else {})
                models.chains.to(accelerator.device)
            return GuardState(**{**info.get("guard", {}), "streak": 0})
        with _legacy_view(path) as view:
            accelerator.load_state(view)
        for index, value in enumerate(ema.values()):
            state = torch.load(
                path / f"custom_checkpoint_{index}.pkl", map_location="cpu", weights_only=True
            )
            value.load_state_dict(state)
            value.to(accelerator.device)
        return GuardState()
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as err:
        if is_out_of_memory(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"checkpoint {path} cannot be loaded: {first}") from None


@contextlib.contextmanager
def _legacy_view(path: Path) -> Iterator[str]:
    """A folder of links to a pre-checkpoint.json checkpoint without its pickled EMAs, which accelerate
    would unpickle unsafely (``weights_only=False``); ``load_checkpoint`` reads them with ``weights_only``."""
    with tempfile.TemporaryDirectory(prefix="cdrl-checkpoint-") as view:
        for file in path.iterdir():
            if not LEGACY_EMA_RE.fullmatch(file.name):
                os.symlink(file.resolve(), Path(view) / file.name)
        yield view


def _ema_state(ema: dict[str, EMAModel]) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The EMAs as safetensors tensors ('ebm.0', ...) and their scalar settings (JSON)."""
    tensors, info = {}, {}
    for name, value in ema.items():
        state = dict(value.state_dict())
        for index, param in enumerate(state.pop("shadow_params")):
            tensors[f"{name}.{index}"] = param.detach().cpu().contiguous()
        info[name] = {k: v for k, v in state.items() if isinstance(v, bool | int | float | str)}
    return tensors, info


def _load_ema(
    ema: dict[str, EMAModel], tensors: dict[str, Tensor], info: dict[str, Any], device: torch.device
) -> None:
    for name, value in ema.items():
        count = len(value.shadow_params)
        keys = [f"{name}.{index}" for index in range(count)]
        if any(key not in tensors for key in keys) or f"{name}.{count}" in tensors:
            raise ValueError(f"{EMA_WEIGHTS} does not hold {count} tensors for the {name} EMA")
        value.load_state_dict({**info[name], "shadow_params": [tensors[key] for key in keys]})
        value.to(device)


def scale_learning_rates(models: Models, cfg: Config, scale: float) -> None:
    """Set both base learning rates to the config's times ``scale``, at the schedule's current position.

    Used after a rollback (``scale = guard.lr_factor ** rollbacks``) and on resume (the config's rates
    win over the checkpoint's, scaled by the rollbacks the checkpoint had seen).
    """
    pairs = [(models.ebm_opt, models.ebm_sched, cfg.train.ebm_lr)]
    if models.init_opt is not None:
        pairs.append((models.init_opt, models.init_sched, cfg.train.init_lr))
    for optimizer, accelerated, lr in pairs:
        scheduler = getattr(accelerated, "scheduler", accelerated)
        for index, group in enumerate(optimizer.param_groups):
            base = lr * scale
            group["lr"] *= base / scheduler.base_lrs[index]
            group["initial_lr"] = base
            scheduler.base_lrs[index] = base
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# ----------------------------------------------------------------------------------------------------------
# Exports and sample grids.


def refresh_ema_copy(ema: EMAModel, live: nn.Module, target: nn.Module) -> nn.Module:
    """Load the EMA weights into ``target`` (buffers from ``live``); refresh spectral-norm vectors."""
    target.load_state_dict(live.state_dict())
    ema.copy_to(target.parameters())
    has_sn = any("parametrizations" in name for name, _ in target.named_parameters())
    if has_sn:  # a few power iterations so sigma matches the EMA weights, not the live ones
        target.train()
        with torch.no_grad():
            for module in target.modules():
                if hasattr(module, "parametrizations"):
                    for _ in range(5):
                        _ = module.weight  # in train mode each access runs one power iteration
    return target.eval()


def calibrate_on(
    pipeline: CDRLPipeline, dataset: torch.utils.data.Dataset, cfg: Config, num_samples: int = 4096
) -> None:
    """Fit a conditional pipeline's implicit-classifier offsets on (up to) ``num_samples`` training examples
    (``CDRLPipeline.calibrate``), so its export supports ``negation="posterior"``."""
    used = calibrate_on_dataset(
        pipeline, dataset, cfg.data.scale, num_samples=num_samples, seed=cfg.train.seed
    )
    logger.info(f"calibrated the implicit classifier's offsets on {used} training examples")


def save_samples(
    pipeline: CDRLPipeline, x_top: Tensor, cond: Tensor | None, folder: Path, step: int
) -> None:
    """Grids of the initializer-only chain (K = 0) and the refined chain, from fixed noise."""
    schedule, settings = pipeline.scheduler.schedule, pipeline.scheduler.langevin_settings()
    null = None if cond is None else torch.tensor(pipeline.condition_sizes).expand_as(cond)
    terms = () if cond is None else ((cond, 1.0),)
    kinds = {"refined": settings}
    if pipeline.initializer is not None:
        kinds["init"] = dataclasses.replace(settings, n_steps=0)
    for name, kind_settings in kinds.items():
        x = sample(pipeline.ebm, pipeline.initializer, schedule, x_top, kind_settings, null=null, terms=terms,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
        path = folder / f"{step:07d}_{name}.png"
        x = x / pipeline.scheduler.config.data_scale
        if x.dim() == 2:
            save_scatter(x, path)
        else:
            nrow = pipeline.condition_sizes[0] if cond is not None else None
            save_grid(x, path, nrow=nrow, upscale=max(1, 64 // x.shape[-1]))


# ----------------------------------------------------------------------------------------------------------
# The loop.


def accelerator_precision(cfg: Config) -> str | None:
    """``Accelerator``'s mixed_precision for ``train.mixed_precision``: "auto" is None (the launcher's
    flag or `accelerate config` decide, as in diffusers' scripts); an explicit value wins over both."""
    return None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision


_STARTED: set[Path] = set()  # run folders this process has begun writing into
# run folder -> (the open lock file, the lock file's text and times before, or None if this run made it)
_RUN_LOCKS: dict[Path, tuple[Any, tuple[str, int, int] | None]] = {}


def _hold_run_lock(output_dir: Path) -> None:
    """Take ``output_dir``'s lock for this process (once; ``run`` releases it)."""
    key, path = output_dir.resolve(), output_dir / RUN_LOCK
    if key not in _RUN_LOCKS:
        before = None
        if path.is_file():
            before = (path.read_text(), path.stat().st_atime_ns, path.stat().st_mtime_ns)
        try:
            _RUN_LOCKS[key] = (lock_run_folder(output_dir), before)
        except RunLockedError as err:
            raise UsageError(str(err)) from None


def _release_run_lock(output_dir: Path) -> None:
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


def run(cfg: Config, *, resume: str | None = None) -> Path:
    """Train with ``cfg``, holding the run folder's lock; returns the exported pipeline folder."""
    try:
        return _run(cfg, resume)
    finally:
        _release_run_lock(Path(cfg.log.output_dir))


def _run(cfg: Config, resume: str | None) -> Path:
    """Train with ``cfg``; returns the exported pipeline folder.

    Everything that can be checked is checked before the first step, and the run's files appear only
    once that step has worked: bad input (including a batch too large for memory) leaves nothing behind.
    """
    output_dir = Path(cfg.log.output_dir)
    prepare_output_dir(output_dir, resume)
    resolve_resume(output_dir, resume)  # fail fast on a bad --resume_from_checkpoint
    if (
        output_dir.is_dir() and int(os.environ.get("RANK", "0")) == 0
    ):  # one process trains into a run
        _hold_run_lock(output_dir)
    dataset = load_dataset(cfg.data, split="train")
    if len(dataset) < cfg.train.batch_size:
        raise DataError(
            f"data set '{cfg.data.name}' has {len(dataset)} examples, fewer than train.batch_size={cfg.train.batch_size}"
        )
    condition_sizes = tuple(dataset.condition_sizes) if cfg.data.class_conditional else ()
    if cfg.data.class_conditional and not condition_sizes:
        raise ConfigError(
            f"data.class_conditional=true, but data set '{cfg.data.name}' has no labels; "
            "for a 2-D toy set data.attributes: [xband, yband]"
        )

    report_to = _tracker(cfg.log.report_to)
    try:
        accelerator = Accelerator(
            mixed_precision=accelerator_precision(cfg),
            log_with=report_to,
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
            ),
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True, data_seed=cfg.train.seed
            ),
        )
    except (ValueError, ImportError) as err:
        raise UsageError(f"accelerate cannot start with this setup: {error_line(err)}") from None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != accelerator.num_processes:
        raise UsageError(
            f"launched as {world_size} processes, but accelerate sees {accelerator.num_processes}; on CPU use "
            "`accelerate launch --cpu ...` or set ACCELERATE_USE_CPU=1 for torchrun"
        )
    cfg.train.mixed_precision = str(
        accelerator.mixed_precision
    )  # what runs, for config.yaml and the step
    set_seed(cfg.train.seed, device_specific=True)
    if accelerator.device.type == "cuda":
        prec.set_tf32(cfg.train.tf32)
    return _train(cfg, accelerator, dataset, condition_sizes, output_dir, resume)


def _train(
    cfg: Config,
    accelerator: Accelerator,
    dataset: torch.utils.data.Dataset,
    condition_sizes: tuple[int, ...],
    output_dir: Path,
    resume: str | None,
) -> Path:
    """The body of ``run`` once the data and the accelerator are set up."""
    schedule = CDRLScheduler.from_training_config(cfg).schedule

    # Models, EMA copies, optimizers (Adam for the EBM, AdamW for the initializer), warmup.
    ebm, init = _build_checked(cfg, tuple(dataset.sample_shape), condition_sizes)
    ebm_ema_model, init_ema_model = copy.deepcopy(ebm), copy.deepcopy(init)
    for network in (ebm, init):  # after the EMA copies, which stay plain for export
        if network is not None:
            if cfg.train.channels_last:
                prec.to_channels_last(network)
            prec.maybe_compile(network, cfg.train.compile)
    ema = {
        "ebm": EMAModel(
            ebm.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=cfg.train.ema_warmup
        )
    }
    betas = (cfg.train.adam_beta1, cfg.train.adam_beta2)
    ebm_opt = torch.optim.Adam(ebm.parameters(), lr=cfg.train.ebm_lr, betas=betas)
    warmup = cfg.train.warmup_steps * accelerator.num_processes
    total = cfg.train.max_steps * accelerator.num_processes
    ebm_sched = lr_schedule(cfg.train.lr_schedule, ebm_opt, warmup, total)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        # The loader's own generator: building an iterator then draws nothing from the global RNG.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    if init is not None:
        ema["init"] = EMAModel(
            init.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=cfg.train.ema_warmup
        )
        init_opt = torch.optim.AdamW(init.parameters(), lr=cfg.train.init_lr, betas=betas,
                                     weight_decay=cfg.train.init_weight_decay)  # fmt: skip
        init_sched = lr_schedule(cfg.train.lr_schedule, init_opt, warmup, total)
        ebm, init, ebm_opt, init_opt, ebm_sched, init_sched, loader = accelerator.prepare(
            ebm, init, ebm_opt, init_opt, ebm_sched, init_sched, loader
        )
    else:
        init_opt = init_sched = None
        ebm, ebm_opt, ebm_sched, loader = accelerator.prepare(ebm, ebm_opt, ebm_sched, loader)
    for value in ema.values():  # saved by save_checkpoint (safetensors), not by accelerate (pickle)
        value.to(accelerator.device)
    tc = cfg.train
    chains = None
    if tc.persistent_levels > 0 and tc.persistent_fraction > 0:
        chains = PersistentChains(tc.persistent_levels, tc.persistent_size,
                                  fraction=tc.persistent_fraction, reset=tc.persistent_reset,
                                  condition_sizes=condition_sizes)  # fmt: skip
    models = Models(ebm, init, ebm_opt, init_opt, ebm_sched, init_sched, chains)
    if len(loader) == 0:
        raise DataError(
            f"data set '{cfg.data.name}' gives no full batch of {cfg.train.batch_size} per process"
        )

    # Resume: models, optimizers, schedulers, EMAs, RNG states and guard counters; the step from the name.
    step, resume_path, warnings = resolve_resume(output_dir, resume)
    guard = GuardState()
    if resume_path is not None:
        guard = load_checkpoint(accelerator, resume_path, models, ema)
        scale_learning_rates(models, cfg, cfg.guard.lr_factor**guard.rollbacks)
    for warning in warnings:
        _warn(accelerator, warning)

    # Fixed noise (and labels) for comparable sample grids (diffusers).
    grid_gen = torch.Generator().manual_seed(cfg.log.sample_seed)
    n_grid = cfg.log.num_grid_samples
    grid_cond = None
    if condition_sizes:
        n_grid = condition_sizes[0] * max(1, n_grid // condition_sizes[0])
        labels = torch.arange(condition_sizes[0]).repeat_interleave(n_grid // condition_sizes[0])
        grid_cond = torch.tensor(condition_sizes).expand(n_grid, -1).clone()
        grid_cond[:, 0] = labels
        grid_cond = grid_cond.to(accelerator.device)
    x_grid = torch.randn(n_grid, *dataset.sample_shape, generator=grid_gen).to(accelerator.device)

    def ema_pipeline() -> CDRLPipeline:
        live_ebm = accelerator.unwrap_model(ebm)
        ebm_copy = refresh_ema_copy(ema["ebm"], live_ebm, ebm_ema_model.to(accelerator.device))
        init_copy = None
        if init is not None:
            live_init = accelerator.unwrap_model(init)
            init_copy = refresh_ema_copy(
                ema["init"], live_init, init_ema_model.to(accelerator.device)
            )
        pipeline = CDRLPipeline(
            ebm=ebm_copy, initializer=init_copy, scheduler=CDRLScheduler.from_training_config(cfg)
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def start() -> tuple[logging.Handler | None, tqdm]:
        """The run's files, trackers and progress bar, once the first step has worked."""
        handler = start_run_files(cfg, accelerator, output_dir, None if resume is None else step)
        if accelerator.is_main_process:
            accelerator.init_trackers("cdrl", config=flat(cfg))
        if resume_path is not None:
            logger.info(f"resumed from {resume_path} at step {step}")
        for warning in warnings:
            logger.warning(warning)
        bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train",
                   disable=not accelerator.is_local_main_process)  # fmt: skip
        return handler, bar

    # Train.
    sums: dict[str, Tensor] = {}
    n_sum, t_start = 0, time.time()
    handler = bar = None
    try:
        while step < cfg.train.max_steps:
            epoch, skip = divmod(step, len(loader))
            loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in batches:
                stats, problem = train_step(
                    models, batch, cfg, schedule, accelerator, condition_sizes
                )
                if bar is None:
                    handler, bar = start()
                step += 1
                bar.update(1)
                if problem is not None:
                    target = on_bad_step(
                        problem, step, guard, cfg, accelerator, output_dir, models, ema
                    )
                    if target is not None:  # rolled back: replay the data order from the checkpoint
                        step, sums, n_sum, bar.n = target, {}, 0, target
                        break
                else:
                    # Update EMAs, log, sample, save, in that order.
                    guard.streak = 0
                    ema["ebm"].step(accelerator.unwrap_model(ebm).parameters())
                    if init is not None:
                        ema["init"].step(accelerator.unwrap_model(init).parameters())
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0) + value.detach().float()
                    n_sum += 1
                if step % cfg.log.log_every == 0 or step == cfg.train.max_steps:
                    record = _summarize(sums, n_sum) if n_sum else {}
                    record.update({"step": step, "lr/ebm": ebm_sched.get_last_lr()[0],
                                   "guard/skipped": guard.skipped, "guard/rollbacks": guard.rollbacks,
                                   "time/elapsed_s": round(time.time() - t_start, 2)})  # fmt: skip
                    _log_metrics(accelerator, output_dir, record, bar)
                    sums, n_sum = {}, 0
                grid_due = cfg.log.sample_every and step % cfg.log.sample_every == 0
                if grid_due and accelerator.is_main_process:
                    save_samples(ema_pipeline(), x_grid, grid_cond, output_dir / "samples", step)
                # Checkpoint, but never a diverging state (in the middle of a streak of bad steps).
                every = cfg.log.checkpointing_steps
                if every and step % every == 0 and guard.streak == 0:
                    save_checkpoint(accelerator, output_dir, step, cfg.log.checkpoints_total_limit,
                                    ema, guard, chains)  # fmt: skip
                if step >= cfg.train.max_steps:
                    break
        if bar is None:  # nothing to train (resumed at max_steps)
            handler, bar = start()

        # Never publish a diverging state: a run that ends inside a streak of bad steps, or with non-finite
        # EMA weights, writes no final checkpoint and leaves pipeline/ as it was.
        final_problem = _final_state_problem(guard, ema, step)
        if final_problem is not None:
            good = list_checkpoints(output_dir)
            where = (
                f"the last good checkpoint is {good[-1][1]}" if good else "there is no checkpoint"
            )
            raise DivergenceError(
                f"training ended with {final_problem}: nothing was exported ({output_dir / 'pipeline'} is "
                f"as it was); {where}: resume from it with a lower --learning_rate"
            )

        # Final checkpoint, grid and export of the EMA pipeline.
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints or checkpoints[-1][0] != step:
            save_checkpoint(
                accelerator, output_dir, step, cfg.log.checkpoints_total_limit, ema, guard, chains
            )
        export_dir = output_dir / "pipeline"
        if accelerator.is_main_process:
            pipeline = ema_pipeline()
            _say(f"step {step}: sampling the final grid into {output_dir / 'samples'}")
            save_samples(pipeline, x_grid, grid_cond, output_dir / "samples", step)
            if condition_sizes:  # the implicit classifier's offsets, for negation="posterior"
                _say("calibrating the implicit classifier's offsets on training examples")
                calibrate_on(pipeline, dataset, cfg)
            export_pipeline(pipeline, cfg, export_dir)
            _say(f"exported the EMA pipeline to {export_dir}")
            # A run too short to have logged a step has no curves yet.
            with contextlib.suppress(ValueError):
                curves = plot_curves(output_dir / "metrics.jsonl", output_dir / CURVES_FILE)
                _say(f"training curves: {curves}")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return export_dir
    finally:
        if bar is not None:
            bar.close()
        if handler is not None:
            logging.getLogger(__name__).removeHandler(handler)
            handler.close()


def _final_state_problem(guard: GuardState, ema: dict[str, Any], step: int) -> str | None:
    """Why the run's final state must not be exported (None when it may): it ends inside a streak of
    bad steps, or an EMA weight is not finite. The same answer on every process (their states agree)."""
    if guard.streak:
        return f"{guard.streak} bad step{'s' * (guard.streak > 1)} in a row up to step {step}"
    for name, model in ema.items():
        if any(not torch.isfinite(p).all() for p in model.shadow_params):
            return f"non-finite weights in the {name} EMA at step {step}"
    return None


def _say(message: str) -> None:
    """A stage of the run's end on the console (above the progress bar) and in log.txt."""
    tqdm.write(message)
    logger.info(message)


def _log_metrics(
    accelerator: Accelerator, output_dir: Path, record: dict[str, Any], bar: tqdm
) -> None:
    """One line of metrics.jsonl, the trackers, log.txt and the progress bar's summary."""
    if accelerator.is_main_process:
        _append_jsonl(output_dir / "metrics.jsonl", record)
        bar.set_postfix(
            gap=f"{record.get('ebm/energy_gap', float('nan')):.3g}",
            loss=f"{record.get('ebm/loss', float('nan')):.3g}",
        )
    accelerator.log(record, step=record["step"])
    logger.info(json.dumps(record))


def _build_checked(cfg: Config, sample_shape: tuple[int, ...], condition_sizes: tuple[int, ...]):
    """``build_models``, with a construction failure (a layer that rejects the config) as a ConfigError."""
    try:
        return build_models(cfg, sample_shape, condition_sizes)
    except ConfigError:
        raise
    except (ValueError, TypeError, RuntimeError) as err:
        if is_out_of_memory(err):
            raise
        raise ConfigError(
            f"the networks cannot be built from this config: {error_line(err)}"
        ) from None


def on_bad_step(
    problem: str,
    step: int,
    guard: GuardState,
    cfg: Config,
    accelerator: Accelerator,
    output_dir: Path,
    models: Models,
    ema: dict[str, EMAModel],
) -> int | None:
    """Count and log a skipped step; after ``guard.max_bad_steps`` in a row, roll back.

    A rollback restores the newest complete checkpoint (models, optimizers, EMAs, RNG states) and scales
    both learning rates by ``guard.lr_factor`` once more.

    Returns:
        The step of the checkpoint rolled back to, or None (training goes on).

    Raises:
        DivergenceError: the guard is off, there is no checkpoint yet, or ``guard.max_rollbacks`` rollbacks
            did not help.
    """
    guard.skipped += 1
    guard.streak += 1
    event = {"step": step, "event": "skipped", "reason": problem, "guard/skipped": guard.skipped,
             "guard/streak": guard.streak}  # fmt: skip
    _log_event(accelerator, output_dir, event)
    _warn(accelerator, f"step {step} skipped ({guard.streak} in a row): {problem}")
    what = f"{guard.streak} bad step{'s' * (guard.streak > 1)} in a row up to step {step} (last: {problem})"
    checkpoints = list_checkpoints(output_dir)
    if not cfg.guard.enabled:
        stop = f"step {step}: {problem}; training stopped (guard.enabled=false)"
    elif guard.streak < cfg.guard.max_bad_steps:
        return None
    elif not checkpoints:
        stop = (
            f"training diverged: {what}, and there is no checkpoint to roll back to yet; lower "
            "train.ebm_lr (or langevin.b2), or save checkpoints more often (log.checkpointing_steps)"
        )
    elif guard.rollbacks >= cfg.guard.max_rollbacks:
        scale = cfg.guard.lr_factor**guard.rollbacks
        stop = (
            f"training diverged: {what}, after {guard.rollbacks} rollback(s) with the learning rates "
            f"scaled by {scale:g}; the last good checkpoint is {checkpoints[-1][1]}; lower train.ebm_lr "
            "(or langevin.b2), or allow more rollbacks (guard.max_rollbacks)"
        )
    else:
        target, path = checkpoints[-1]
        load_checkpoint(accelerator, path, models, ema)
        guard.rollbacks += 1
        guard.streak = 0
        scale_learning_rates(models, cfg, cfg.guard.lr_factor**guard.rollbacks)
        lr = models.ebm_sched.get_last_lr()[0]
        _log_event(accelerator, output_dir, {"step": step, "event": "rollback", "to_step": target,
                                             "checkpoint": path.name, "guard/rollbacks": guard.rollbacks,
                                             "lr/ebm": lr})  # fmt: skip
        _warn(accelerator, f"{what}: rolled back to {path.name}, learning rates scaled by "
                           f"{cfg.guard.lr_factor**guard.rollbacks:g} (rollback {guard.rollbacks} of "
                           f"at most {cfg.guard.max_rollbacks})")  # fmt: skip
        return target
    _log_event(accelerator, output_dir, {"step": step, "event": "stopped", "reason": stop})
    raise DivergenceError(stop)


def _log_event(accelerator: Accelerator, output_dir: Path, event: dict[str, Any]) -> None:
    """A guard event as a line of metrics.jsonl (it has an "event" key) and of log.txt."""
    if accelerator.is_main_process:
        _append_jsonl(output_dir / "metrics.jsonl", event)
    logger.info(json.dumps(event))



def _summarize(sums: dict[str, Tensor], n: int) -> dict[str, float]:
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


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _tracker(report_to: str) -> str | None:
    """The accelerate tracker for ``log.report_to``; a tracker whose package is missing is refused before
    anything is written (it would otherwise train to the end with no logs)."""
    import importlib.util

    if report_to in ("none", "", None):
        return None
    package = TRACKER_PACKAGES.get(report_to)
    if package is None:
        raise UsageError(
            f"log.report_to={report_to!r} is not a tracker cdrl knows; use tensorboard, wandb or none"
        )
    if importlib.util.find_spec(package) is None:
        raise UsageError(
            f"log.report_to={report_to} needs the {package} package: pip install {package}, "
            "or pass --report_to none (metrics.jsonl is written either way)"
        )
    return report_to


# ----------------------------------------------------------------------------------------------------------
# Command line.

FLAG_TO_KEY = {
    "output_dir": "log.output_dir",
    "train_batch_size": "train.batch_size",
    "max_train_steps": "train.max_steps",
    "learning_rate": "train.ebm_lr",
    "mixed_precision": "train.mixed_precision",
    "checkpointing_steps": "log.checkpointing_steps",
    "checkpoints_total_limit": "log.checkpoints_total_limit",
    "seed": "train.seed",
    "report_to": "log.report_to",
}


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = ArgumentParser(
        prog="train.py",
        description="Train a CDRL (or DRL) energy-based model. Launch with `accelerate launch train.py ...` "
        "for several processes; plain `python train.py` runs one.",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_RECIPE,
        help="a YAML file of the settings that differ from the defaults, or a packaged recipe by name "
        f"({', '.join(recipe_names())}); default: {DEFAULT_RECIPE}",
    )
    add_config_overrides(parser)
    parser.add_argument("--output_dir", help="run folder (log.output_dir)")
    parser.add_argument("--train_batch_size", help="batch size per process (train.batch_size)")
    parser.add_argument("--max_train_steps", help="optimizer steps (train.max_steps)")
    parser.add_argument("--learning_rate", help="EBM learning rate (train.ebm_lr)")
    parser.add_argument("--mixed_precision", help="no | fp16 | bf16 (train.mixed_precision)")
    parser.add_argument("--checkpointing_steps", help="steps between resumable checkpoints")
    parser.add_argument("--checkpoints_total_limit", help="keep at most this many checkpoints")
    parser.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-N folder")
    parser.add_argument("--seed", help="training seed (train.seed)")
    parser.add_argument("--report_to", help="tensorboard | wandb | none (log.report_to)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    overrides = list(args.set)
    overrides += [
        f"{key}={getattr(args, flag)}"
        for flag, key in FLAG_TO_KEY.items()
        if getattr(args, flag) is not None
    ]
    return load_config(config_path(args.config), overrides), args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input or divergence, with a one-line message)."""
    try:
        cfg, args = parse_args(argv)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
            return 0
        export_dir = run(cfg, resume=args.resume_from_checkpoint)
    except (ConfigError, DataError, UsageError, CLIError, DivergenceError) as err:
        message = " ".join(str(err).split())
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        message = (
            f"{describe_out_of_memory(err)} with train.batch_size={cfg.train.batch_size} and "
            f"log.num_grid_samples={cfg.log.num_grid_samples}; lower them, or narrow the networks"
        )
    else:
        print(f"done: pipeline saved to {export_dir}")
        return 0
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
