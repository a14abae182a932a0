"""The training loop: ``run(cfg)`` sets up the data, the accelerator and the networks, trains with
crash-safe checkpoints, rollbacks, logs and sample grids, and exports the EMA pipeline at the end.

Everything that can be checked is checked before the first step, and the run's files appear only once
that step has worked: bad input (including a batch too large for memory) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from torch import Tensor
from tqdm.auto import tqdm

from cdrl import precision as prec
from cdrl.calibration import calibrate_on_dataset
from cdrl.config import MAX_COUNTS, Config, flat
from cdrl.data import load_dataset
from cdrl.export import export_pipeline
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.training.checkpoint import (
    check_resume_config,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from cdrl.training.curves import CURVES_FILE, plot_curves
from cdrl.training.guard import GuardState, check_final_state, on_bad_step
from cdrl.training.run_dir import (
    export_figures,
    hold_run_lock,
    log_event,
    log_images,
    log_metrics,
    prepare_output_dir,
    release_run_lock,
    save_samples,
    say,
    start_run_files,
    stop_log_file,
    summarize,
    warn,
)
from cdrl.training.signals import StopRequest, TrainingStopped
from cdrl.training.state import (
    TrainingSetup,
    accelerator_precision,
    build_training,
    noise_schedule,
    refresh_ema_copy,
    scale_learning_rates,
)
from cdrl.training.step import MicroBatches, skip_micro_batch, train_step
from cdrl.utils import ConfigError, DataError, UsageError, error_line

logger = get_logger(__name__)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def run(cfg: Config, *, resume: str | None = None, command: str | None = None) -> Path:
    """Train with ``cfg``, holding the run folder's lock; returns the exported pipeline folder.

    Args:
        resume: 'latest', a checkpoint-N folder, or None (a fresh run into a new or empty folder).
        command: the command line that started the run, for the exported model card.

    Raises:
        UsageError, ConfigError, DataError, CheckpointError: bad input, before anything is written.
        DivergenceError: training diverged and the guard could not recover.
    """
    try:
        return _run(cfg, resume, command)
    finally:
        release_run_lock(Path(cfg.log.output_dir))


def _run(cfg: Config, resume: str | None, command: str | None) -> Path:
    # The output folder, the data and the accelerator, checked before anything is built.
    output_dir = Path(cfg.log.output_dir)
    prepare_output_dir(output_dir, resume)
    if resolve_resume(output_dir, resume)[1] is not None:  # fail fast on a bad resume
        check_resume_config(output_dir, cfg)
    if output_dir.is_dir() and int(os.environ.get("RANK", "0")) == 0:  # one process trains a run
        hold_run_lock(output_dir)
    report_to = _tracker(cfg.log.report_to)
    try:
        accelerator = Accelerator(
            mixed_precision=accelerator_precision(cfg),
            **_accumulation(cfg),
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
    cfg.train.mixed_precision = str(accelerator.mixed_precision)  # what runs: config.yaml, the step
    micro_batches = accelerator.gradient_accumulation_steps
    if not 1 <= micro_batches <= MAX_COUNTS["train.gradient_accumulation_steps"]:
        raise UsageError(
            f"gradient accumulation over {micro_batches} micro-batches (ACCELERATE_GRADIENT_ACCUMULATION_STEPS); "
            f"give 1 to {MAX_COUNTS['train.gradient_accumulation_steps']:,}"
        )
    cfg.train.gradient_accumulation_steps = micro_batches
    # The data, prepared by the main process first (a download happens once), checked before anything is built.
    dataset = _load_data(cfg, accelerator)
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
    set_seed(cfg.train.seed, device_specific=True)
    if accelerator.device.type == "cuda":
        prec.set_tf32(cfg.train.tf32)

    # The noise schedule; the exported scheduler is built now too, so a setting it refuses stops here.
    schedule = noise_schedule(cfg)
    CDRLScheduler.from_training_config(cfg)

    # Networks, EMAs, optimizers, LR schedulers, the data loader and the persistent chains, prepared.
    setup = build_training(
        cfg, accelerator, tuple(dataset.sample_shape), condition_sizes, dataset=dataset
    )
    models, ema, loader = setup.models, setup.ema, setup.loader
    ebm_ema_model, init_ema_model = setup.ema_copies
    ebm, init = models.ebm, models.initializer
    if len(loader) == 0:
        raise DataError(
            f"data set '{cfg.data.name}' gives no full batch of {cfg.train.batch_size} per process"
        )

    # Resume: models, optimizers, schedulers, EMAs, RNG states and guard counters; the step from the name.
    step, resume_path, warnings = resolve_resume(output_dir, resume)
    guard = GuardState()
    if resume_path is not None:
        guard = GuardState.restored(load_checkpoint(accelerator, resume_path, models, ema))
        scale_learning_rates(models, cfg, cfg.guard.lr_factor**guard.rollbacks)
    for warning in warnings:
        warn(accelerator, warning)

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
        handler = start_run_files(
            cfg, accelerator, output_dir, None if resume is None else step, command
        )
        if accelerator.is_main_process:
            accelerator.init_trackers("cdrl", config=flat(cfg))
        if resume_path is not None:
            logger.info(f"resumed from {resume_path} at step {step}")
        for warning in warnings:
            logger.warning(warning)
        bar = tqdm(
            total=cfg.train.max_steps,
            initial=step,
            desc="train",
            disable=not accelerator.is_local_main_process,
        )
        return handler, bar

    # Train. A step is an optimizer step: ``micro_batches`` batches, the last cycle of an epoch shorter when
    # they do not divide the epoch (accelerate's accumulate syncs at the loader's end, as in diffusers).
    sums: dict[str, Tensor] = {}
    n_sum, t_start = 0, time.time()
    handler = bar = None
    steps_per_epoch = math.ceil(len(loader) / micro_batches)
    cycle = MicroBatches()
    stop = StopRequest()  # SIGINT / SIGTERM: finish the step, checkpoint, stop (signals.py)
    try:
        stop.install()
        while step < cfg.train.max_steps:
            epoch, done = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            skip = done * micro_batches
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in batches:
                if cycle.spoiled:  # an earlier micro-batch of this step was refused: no update
                    result = skip_micro_batch(models, accelerator)
                else:
                    result = train_step(models, batch, cfg, schedule, accelerator, condition_sizes)
                result = cycle.add(result, accelerator)
                if result is None:  # accumulating: the optimizer step is not complete yet
                    continue
                stats, problem = result
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
                    record = summarize(sums, n_sum) if n_sum else {}
                    record.update(
                        {
                            "step": step,
                            "lr/ebm": models.ebm_sched.get_last_lr()[0],
                            "guard/skipped": guard.skipped,
                            "guard/rollbacks": guard.rollbacks,
                            "time/elapsed_s": round(time.time() - t_start, 2),
                        }
                    )
                    log_metrics(accelerator, output_dir, record, bar)
                    sums, n_sum = {}, 0
                grid_due = cfg.log.sample_every and step % cfg.log.sample_every == 0
                if grid_due and accelerator.is_main_process:
                    grids = save_samples(
                        ema_pipeline(), x_grid, grid_cond, output_dir / "samples", step
                    )
                    log_images(accelerator, grids, step)
                # Checkpoint, but never a diverging state (in the middle of a streak of bad steps).
                every = cfg.log.checkpointing_steps
                if every and step % every == 0 and guard.streak == 0:
                    _checkpoint(cfg, accelerator, output_dir, step, setup, guard)
                signum = stop.requested(accelerator)
                if signum is not None:
                    raise _stopped(signum, cfg, accelerator, output_dir, step, setup, guard)
                if step >= cfg.train.max_steps:
                    break
        stop.restore()
        if bar is None:  # nothing to train (resumed at max_steps)
            handler, bar = start()
        check_final_state(guard, ema, step, output_dir)

        # Final checkpoint, grid and export of the EMA pipeline.
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints or checkpoints[-1][0] != step:
            _checkpoint(cfg, accelerator, output_dir, step, setup, guard)
        export_dir = output_dir / "pipeline"
        if accelerator.is_main_process:
            pipeline = ema_pipeline()
            say(f"step {step}: sampling the final grid into {output_dir / 'samples'}")
            grids = save_samples(pipeline, x_grid, grid_cond, output_dir / "samples", step)
            log_images(accelerator, grids, step)
            if condition_sizes:  # the implicit classifier's offsets, for negation="posterior"
                say("calibrating the implicit classifier's offsets on training examples")
                calibrate_on(pipeline, dataset, cfg)
            figures = export_figures(output_dir)
            export_pipeline(pipeline, cfg, export_dir, step=step, command=command, figures=figures)
            say(f"exported the EMA pipeline to {export_dir}")
            # A run too short to have logged a step has no curves yet.
            with contextlib.suppress(ValueError):
                curves = plot_curves(output_dir / "metrics.jsonl", output_dir / CURVES_FILE)
                say(f"training curves: {curves}")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return export_dir
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        stop_log_file(handler)


def _stopped(
    signum: int,
    cfg: Config,
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    setup: TrainingSetup,
    guard: GuardState,
) -> TrainingStopped:
    """Save checkpoint-N of the step just finished (never a diverging state) for a signal's stop."""
    saved = [s for s, _ in list_checkpoints(output_dir)]
    if guard.streak == 0 and (not saved or saved[-1] != step):
        _checkpoint(cfg, accelerator, output_dir, step, setup, guard)
        saved.append(step)
    if saved and saved[-1] == step:
        where = f"saved {output_dir / f'checkpoint-{step}'}"
    elif saved:
        where = f"inside a streak of bad steps: the newest checkpoint is checkpoint-{saved[-1]}"
    else:
        where = "inside a streak of bad steps, with no checkpoint yet"
    log_event(accelerator, output_dir, {"step": step, "event": "stopped", "signal": signum})
    return TrainingStopped(signum, step, where)


def _checkpoint(
    cfg: Config,
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    setup: TrainingSetup,
    guard: GuardState,
) -> None:
    """checkpoint-N of the run's state, its EMAs, chains and guard counters (``save_checkpoint``)."""
    save_checkpoint(
        accelerator,
        output_dir,
        step,
        cfg.log.checkpoints_total_limit,
        setup.ema,
        dataclasses.asdict(guard),
        setup.models.chains,
    )


def calibrate_on(
    pipeline: CDRLPipeline, dataset: torch.utils.data.Dataset, cfg: Config, num_samples: int = 4096
) -> None:
    """Fit a conditional pipeline's implicit-classifier offsets on (up to) ``num_samples`` training examples
    (``CDRLPipeline.calibrate``), so its export supports ``negation="posterior"``."""
    used = calibrate_on_dataset(
        pipeline, dataset, cfg.data.scale, num_samples=num_samples, seed=cfg.train.seed
    )
    logger.info(f"calibrated the implicit classifier's offsets on {used} training examples")


def _accumulation(cfg: Config) -> dict[str, Any]:
    """``Accelerator``'s gradient accumulation for ``train.gradient_accumulation_steps``: 1 (the default) lets
    ACCELERATE_GRADIENT_ACCUMULATION_STEPS decide (what `accelerate launch --gradient_accumulation_steps`
    sets under DeepSpeed); a larger value wins over it (accelerate's environment would win over an int)."""
    steps = cfg.train.gradient_accumulation_steps
    if steps == 1:
        return {"gradient_accumulation_steps": 1}
    return {"gradient_accumulation_plugin": GradientAccumulationPlugin(num_steps=steps)}


def _load_data(cfg: Config, accelerator: Accelerator) -> torch.utils.data.Dataset:
    """The training set, loaded by the main process first (a CIFAR-10 download happens once), then by the
    others. An error is raised after the main process has left the barrier, so no process waits forever."""
    error = None
    with accelerator.main_process_first():
        try:
            dataset = load_dataset(cfg.data, split="train")
        except ValueError as err:  # ConfigError, DataError
            error = err
    if error is not None:
        raise error
    return dataset


def _tracker(report_to: str) -> str | None:
    """The accelerate tracker for ``log.report_to``; a tracker whose package is missing is refused before
    anything is written (it would otherwise train to the end with no logs)."""
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
