"""Training: ``accelerate launch train.py --config configs/digits.yaml [--set key=value ...] [flags]``.

One function per concern: ``train_step`` (one cooperative update, testable alone) and ``run`` (the loop:
data, models, checkpoints, logs, grids, export). Distribution, mixed precision and checkpoint state are
accelerate's job.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from cdrl.config import Config, ConfigError, flat, load_config, save_config
from cdrl.data import DataError, load_dataset
from cdrl.langevin import langevin_refine
from cdrl.losses import ebm_loss, initializer_loss
from cdrl.models import EnergyMLP, EnergyResNet, InitializerMLP, InitializerUNet
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.sampling import energy_fn, frozen, level, sample
from cdrl.schedule import NoiseSchedule
from cdrl.utils import expand_as, git_sha, save_grid, save_scatter

logger = get_logger(__name__)
RUN_MARKER = "config.yaml"  # a folder holding this file (and checkpoints/metrics) is a cdrl run
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


class UsageError(ValueError):
    """A problem with the command line or the output folder; reported in one line, exit code 2."""


class Models(NamedTuple):
    ebm: nn.Module  # prepared (possibly DDP-wrapped)
    initializer: nn.Module | None
    ebm_opt: torch.optim.Optimizer
    init_opt: torch.optim.Optimizer | None
    ebm_sched: Any
    init_sched: Any


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
) -> dict[str, Tensor]:
    """One cooperative update of the EBM and the initializer (CDRL Alg. 1). Returns detached stats."""
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
    with frozen(ebm_raw):
        y_neg = langevin_refine(
            energy_fn(ebm_raw, lvl, null=cond),
            y_init.detach(),
            x_next,
            sigma=lvl.sigma,
            tether=lvl.tether,
            step_size=lvl.step_size,
            n_steps=cfg.langevin.n_steps,
            noise=cfg.langevin.noise,
        )

    # Update the EBM on positives and refined negatives, in one forward (DRL Eq. (8)).
    ebm.train()
    both_cond = None if cond is None else torch.cat([cond, cond])
    energies = ebm(
        torch.cat([y_pos, y_neg]), torch.cat([lvl.noise_level, lvl.noise_level]), both_cond
    ).float()
    energy_pos, energy_neg = energies.chunk(2)
    if not torch.isfinite(energies).all():
        raise FloatingPointError(
            f"non-finite EBM energies (pos mean {energy_pos.mean().item():.4g}, "
            f"neg mean {energy_neg.mean().item():.4g}); lower train.ebm_lr or langevin.b2"
        )
    loss, stats = ebm_loss(energy_pos, energy_neg, lvl.loss_weight)
    models.ebm_opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    stats["ebm/grad_norm"] = _as_tensor(
        accelerator.clip_grad_norm_(ebm.parameters(), cfg.train.grad_clip)
    )
    models.ebm_opt.step()
    models.ebm_sched.step()
    stats["ebm/loss"] = loss.detach()

    # Update the initializer towards the refined samples: cooperative learning (CDRL Eq. (9)).
    if init is not None:
        init_loss, init_stats = initializer_loss(
            y_init, y_neg, mean=mean, y_pos=y_pos, data_weight=cfg.train.init_data_weight
        )
        models.init_opt.zero_grad(set_to_none=True)
        accelerator.backward(init_loss)
        stats["init/grad_norm"] = _as_tensor(
            accelerator.clip_grad_norm_(init.parameters(), cfg.train.grad_clip)
        )
        models.init_opt.step()
        models.init_sched.step()
        stats.update(init_stats)

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
    return stats


def _as_tensor(value: Any) -> Tensor:
    return value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))


# ----------------------------------------------------------------------------------------------------------
# Run directory, checkpoints, export.


def prepare_output_dir(output_dir: Path, resume: str | None) -> None:
    """Refuse to write into a folder that holds something other than a cdrl run, or a run without --resume."""
    if not output_dir.exists() or not any(output_dir.iterdir()):
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


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (checkpoint-N folders), oldest first."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        match = CHECKPOINT_RE.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match[1]), path))
    return sorted(found)


def resolve_resume(output_dir: Path, resume: str | None) -> tuple[int, Path | None]:
    """(step, folder) to resume from: 'latest', a checkpoint folder, or None (fresh start)."""
    if resume is None:
        return 0, None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else (0, None)
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume
    match = CHECKPOINT_RE.fullmatch(path.name)
    if not path.is_dir() or not match:
        raise UsageError(
            f"--resume_from_checkpoint {resume}: no checkpoint-N folder there; use 'latest'"
        )
    return int(match[1]), path


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, limit: int | None
) -> Path:
    """accelerator.save_state into checkpoint-N via a temporary folder and a rename (crash-safe)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if limit is not None:
            for _, old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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


def export_pipeline(pipeline: CDRLPipeline, cfg: Config, folder: Path) -> None:
    """save_pretrained into a temporary folder, then swap it into place (the old export survives a crash)."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    old = folder.with_name(f".old-{folder.name}")
    for path in (tmp, old):
        if path.exists():
            shutil.rmtree(path)
    pipeline.save_pretrained(tmp)
    save_config(cfg, tmp / "training_config.yaml")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


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


def run(cfg: Config, *, resume: str | None = None) -> Path:
    """Train with ``cfg``; returns the exported pipeline folder."""
    output_dir = Path(cfg.log.output_dir)
    prepare_output_dir(output_dir, resume)
    step, resume_path = resolve_resume(output_dir, resume)
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
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.train.seed
        ),
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != accelerator.num_processes:
        raise UsageError(
            f"launched as {world_size} processes, but accelerate sees {accelerator.num_processes}; on CPU use "
            "`accelerate launch --cpu ...` or set ACCELERATE_USE_CPU=1 for torchrun"
        )
    set_seed(cfg.train.seed, device_specific=True)
    handler = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / RUN_MARKER)
        (output_dir / "git.txt").write_text(git_sha() + "\n")
        handler = logging.FileHandler(output_dir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger(__name__).addHandler(handler)
        logging.getLogger(__name__).setLevel(logging.INFO)
    try:
        return _train(cfg, accelerator, dataset, condition_sizes, output_dir, step, resume_path)
    finally:
        if handler is not None:
            logging.getLogger(__name__).removeHandler(handler)
            handler.close()


def _train(
    cfg: Config,
    accelerator: Accelerator,
    dataset: torch.utils.data.Dataset,
    condition_sizes: tuple[int, ...],
    output_dir: Path,
    step: int,
    resume_path: Path | None,
) -> Path:
    """The body of ``run`` once the run folder and logging are set up."""
    schedule = CDRLScheduler.from_training_config(cfg).schedule

    # Models, EMA copies, optimizers (Adam for the EBM, AdamW for the initializer), warmup.
    ebm, init = build_models(cfg, tuple(dataset.sample_shape), condition_sizes)
    ebm_ema_model, init_ema_model = copy.deepcopy(ebm), copy.deepcopy(init)
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
    for value in ema.values():
        value.to(accelerator.device)
        accelerator.register_for_checkpointing(value)
    models = Models(ebm, init, ebm_opt, init_opt, ebm_sched, init_sched)
    if len(loader) == 0:
        raise DataError(
            f"data set '{cfg.data.name}' gives no full batch of {cfg.train.batch_size} per process"
        )

    # Resume: models, optimizers, schedulers, EMAs and RNG states; the step from the folder name.
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        logger.info(f"resumed from {resume_path} at step {step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("cdrl", config=flat(cfg))

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

    # Train.
    metrics_path = output_dir / "metrics.jsonl"
    sums: dict[str, Tensor] = {}
    n_sum, t_start = 0, time.time()
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=step,
        disable=not accelerator.is_local_main_process,
        desc="train",
    )
    epoch = step // len(loader)
    skip = step % len(loader)
    while step < cfg.train.max_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            stats = train_step(models, batch, cfg, schedule, accelerator, condition_sizes)
            step += 1
            bar.update(1)
            # Update EMAs, log, sample, save, in that order.
            ema["ebm"].step(accelerator.unwrap_model(ebm).parameters())
            if init is not None:
                ema["init"].step(accelerator.unwrap_model(init).parameters())
            for key, value in stats.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
            n_sum += 1
            if step % cfg.log.log_every == 0 or step == cfg.train.max_steps:
                record = _summarize(sums, n_sum)
                record.update({"step": step, "lr/ebm": ebm_sched.get_last_lr()[0],
                               "time/elapsed_s": round(time.time() - t_start, 2)})  # fmt: skip
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(
                        gap=f"{record.get('ebm/energy_gap', 0):.3g}",
                        loss=f"{record['ebm/loss']:.3g}",
                    )
                accelerator.log(record, step=step)
                logger.info(json.dumps(record))
                sums, n_sum = {}, 0
            if (
                cfg.log.sample_every
                and step % cfg.log.sample_every == 0
                and accelerator.is_main_process
            ):
                save_samples(ema_pipeline(), x_grid, grid_cond, output_dir / "samples", step)
            if cfg.log.checkpointing_steps and step % cfg.log.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, step, cfg.log.checkpoints_total_limit)
            if step >= cfg.train.max_steps:
                break
        epoch += 1
    bar.close()

    # Final checkpoint, grid and export of the EMA pipeline.
    if not list_checkpoints(output_dir) or list_checkpoints(output_dir)[-1][0] != step:
        save_checkpoint(accelerator, output_dir, step, cfg.log.checkpoints_total_limit)
    export_dir = output_dir / "pipeline"
    if accelerator.is_main_process:
        pipeline = ema_pipeline()
        save_samples(pipeline, x_grid, grid_cond, output_dir / "samples", step)
        export_pipeline(pipeline, cfg, export_dir)
        logger.info(f"exported the EMA pipeline to {export_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir


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


def _tracker(report_to: str) -> str | None:
    if report_to in ("none", "", None):
        return None
    if report_to == "tensorboard":
        import importlib.util

        return "tensorboard" if importlib.util.find_spec("tensorboard") else None
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
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a CDRL (or DRL) energy-based model. Launch with `accelerate launch train.py ...` "
        "for several processes; plain `python train.py` runs one.",
    )
    parser.add_argument(
        "--config", help="YAML file with the settings that differ from the defaults"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys"
    )
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
    return load_config(args.config, overrides), args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, with a one-line message)."""
    try:
        cfg, args = parse_args(argv)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
            return 0
        export_dir = run(cfg, resume=args.resume_from_checkpoint)
    except (ConfigError, DataError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: pipeline saved to {export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
