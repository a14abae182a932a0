"""What a run trains: the networks, their optimizers, LR schedulers and EMAs, built and prepared as the
training loop uses them (benchmarks build theirs here too), and the noise schedule from the config."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from cdrl import precision as prec
from cdrl.calibration import calibrate_on_dataset
from cdrl.config import Config, load_config
from cdrl.data import load_dataset
from cdrl.models import build_models
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.schedule import NoiseSchedule, make_schedule
from cdrl.training.checkpoint import (
    CHECKPOINT_RE,
    checkpoint_problem,
    list_checkpoints,
    load_for_export,
)
from cdrl.training.persistent import PersistentChains
from cdrl.training.run_dir import RUN_MARKER
from cdrl.training.step import TrainState, lr_schedule
from cdrl.utils import CheckpointError, ConfigError, error_line, is_out_of_memory


class TrainingSetup(NamedTuple):
    models: TrainState  # prepared networks, optimizers, LR schedulers, persistent chains
    ema: dict[str, EMAModel]  # "ebm", and "init" when there is an initializer
    # plain copies of the networks, made before any channels-last / compile: the EMA weights are
    # loaded into them for sample grids and the export (``refresh_ema_copy``)
    ema_copies: tuple[nn.Module, nn.Module | None]
    loader: torch.utils.data.DataLoader | None  # prepared, when a data set was given


def noise_schedule(cfg: Config) -> NoiseSchedule:
    """The noise schedule of ``cfg.schedule`` (the same tensors as the exported scheduler's)."""
    return make_schedule(**dataclasses.asdict(cfg.schedule))


def accelerator_precision(cfg: Config) -> str | None:
    """``Accelerator``'s mixed_precision for ``train.mixed_precision``: "auto" is None (the launcher's
    flag or `accelerate config` decide, as in diffusers' scripts); an explicit value wins over both."""
    return None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision


def build_checked(
    cfg: Config, sample_shape: tuple[int, ...], condition_sizes: tuple[int, ...]
) -> tuple[nn.Module, nn.Module | None]:
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


def _config_precision(cfg: Config) -> Callable[[nn.Module], nn.Module]:
    """``train.channels_last`` and ``train.compile``, applied to a network in place."""

    def apply(network: nn.Module) -> nn.Module:
        if cfg.train.channels_last:
            prec.to_channels_last(network)
        prec.maybe_compile(network, cfg.train.compile)
        return network

    return apply


def build_training(
    cfg: Config,
    accelerator: Accelerator,
    sample_shape: tuple[int, ...],
    condition_sizes: tuple[int, ...] = (),
    *,
    dataset: torch.utils.data.Dataset | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainingSetup:
    """Networks, EMAs, optimizers (Adam for the EBM, AdamW for the initializer) with warmup and decay,
    the data loader when ``dataset`` is given, and the persistent chains, prepared by ``accelerator``.

    Args:
        prepare_model: applied to each network after its EMA copy and before its optimizer (default:
            the config's ``train.channels_last`` and ``train.compile``).
    """
    tc = cfg.train
    prepare_model = prepare_model or _config_precision(cfg)
    ebm, init = build_checked(cfg, tuple(sample_shape), tuple(condition_sizes))
    ema_copies = (copy.deepcopy(ebm), copy.deepcopy(init))
    # After the EMA copies, which stay plain for export.
    ebm = prepare_model(ebm)
    init = None if init is None else prepare_model(init)
    ema = {"ebm": EMAModel(ebm.parameters(), decay=tc.ema_decay, use_ema_warmup=tc.ema_warmup)}
    betas = (tc.adam_beta1, tc.adam_beta2)
    ebm_opt = torch.optim.Adam(ebm.parameters(), lr=tc.ebm_lr, betas=betas)
    # accelerate steps a prepared scheduler once per process on every optimizer step.
    warmup = tc.warmup_steps * accelerator.num_processes
    total = tc.max_steps * accelerator.num_processes
    ebm_sched = lr_schedule(tc.lr_schedule, ebm_opt, warmup, total)
    loaders = []
    if dataset is not None:
        loaders.append(
            torch.utils.data.DataLoader(
                dataset,
                batch_size=tc.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=cfg.data.num_workers,
                # The loader's own generator: building an iterator then draws nothing from the global RNG.
                generator=torch.Generator().manual_seed(tc.seed),
            )
        )
    if init is not None:
        ema["init"] = EMAModel(init.parameters(), decay=tc.ema_decay, use_ema_warmup=tc.ema_warmup)
        init_opt = torch.optim.AdamW(
            init.parameters(), lr=tc.init_lr, betas=betas, weight_decay=tc.init_weight_decay
        )
        init_sched = lr_schedule(tc.lr_schedule, init_opt, warmup, total)
        ebm, init, ebm_opt, init_opt, ebm_sched, init_sched, *loaders = accelerator.prepare(
            ebm, init, ebm_opt, init_opt, ebm_sched, init_sched, *loaders
        )
    else:
        init_opt = init_sched = None
        ebm, ebm_opt, ebm_sched, *loaders = accelerator.prepare(ebm, ebm_opt, ebm_sched, *loaders)
    for value in ema.values():  # saved by save_checkpoint (safetensors), not by accelerate (pickle)
        value.to(accelerator.device)
    chains = None
    if tc.persistent_levels > 0 and tc.persistent_fraction > 0:
        chains = PersistentChains(
            tc.persistent_levels,
            tc.persistent_size,
            fraction=tc.persistent_fraction,
            reset=tc.persistent_reset,
            condition_sizes=tuple(condition_sizes),
        )
    models = TrainState(ebm, init, ebm_opt, init_opt, ebm_sched, init_sched, chains)
    return TrainingSetup(models, ema, ema_copies, loaders[0] if loaders else None)


def scale_learning_rates(models: TrainState, cfg: Config, scale: float) -> None:
    """Set both base learning rates to the config's times ``scale``, at the schedule's current position.

    Used after a rollback (``scale = guard.lr_factor ** rollbacks``) and on resume (the config's rates
    win over the checkpoint's, scaled by the rollbacks the checkpoint had seen). Each LR scheduler is
    rebuilt from its own rate function at its position, from the new base rates (the optimizer's
    ``initial_lr``, which a scheduler built at a position starts from), and replaces the old one inside
    accelerate's wrapper, so the wrapper's checkpointing saves the new one.
    """
    pairs = [(models.ebm_sched, cfg.train.ebm_lr)]
    if models.init_opt is not None:
        pairs.append((models.init_sched, cfg.train.init_lr))
    for accelerated, lr in pairs:
        old = accelerated.scheduler
        for group in old.optimizer.param_groups:
            group["initial_lr"] = lr * scale
        # The constructor takes one step: built at last_epoch - 1, it lands on the current position.
        accelerated.scheduler = LambdaLR(
            old.optimizer, old.lr_lambdas, last_epoch=old.last_epoch - 1
        )


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


def check_run_checkpoint(path: Path) -> Path:
    """``path`` if it is a complete checkpoint-N folder inside a run folder (beside its config.yaml).

    Raises:
        CheckpointError: naming what ``path`` is instead, and the checkpoint to give.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist (give a run's checkpoint-N folder)"
        )
    if path.is_dir() and (path / RUN_MARKER).is_file():
        newest = list_checkpoints(path)
        hint = (
            f": its newest complete one is {newest[-1][1]}" if newest else ", and it has none yet"
        )
        raise CheckpointError(f"{path} is a run folder; give one of its checkpoint-N folders{hint}")
    if not path.is_dir() or not CHECKPOINT_RE.fullmatch(path.name):
        raise CheckpointError(f"{path} is not a run's checkpoint-N folder")
    if not (path.parent / RUN_MARKER).is_file():
        raise CheckpointError(
            f"{path} is not inside a run folder: {path.parent / RUN_MARKER} is missing"
        )
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    return path


def checkpoint_pipeline(
    path: Path, calibration_samples: int = 4096
) -> tuple[CDRLPipeline, Config, int]:
    """The EMA pipeline of a saved step (RUN/checkpoint-N), as the run exports at its end: the networks
    built from RUN/config.yaml and the training set's shapes, the checkpoint's saved state with its EMA
    weights over the parameters (``refresh_ema_copy``), and, for a conditional run, the implicit
    classifier's offsets fitted on training examples. Reads the run; writes nothing.

    Returns:
        The pipeline (CPU, eval mode), the run's config and the checkpoint's step.

    Raises:
        CheckpointError: no checkpoint-N folder of a run, an incomplete or unreadable one, or one that
            does not match its run's config.yaml.
    """
    path = Path(path)
    run_config = check_run_checkpoint(path).parent / RUN_MARKER
    try:
        cfg = load_config(run_config, [])
    except ValueError as err:  # ConfigError
        raise CheckpointError(f"{run_config}: {' '.join(str(err).split())}") from None
    try:  # the shapes and conditions the run trained with (and a conditional run's calibration data)
        dataset = load_dataset(cfg.data, split="train")
    except ValueError as err:  # ConfigError, DataError
        raise CheckpointError(
            f"the training data named in {run_config} cannot be loaded: {' '.join(str(err).split())}"
        ) from None
    condition_sizes = tuple(dataset.condition_sizes) if cfg.data.class_conditional else ()
    ebm, init = build_checked(cfg, tuple(dataset.sample_shape), condition_sizes)
    networks = {"ebm": ebm} if init is None else {"ebm": ebm, "init": init}
    step, ema = load_for_export(path, networks)
    for name, network in networks.items():
        refresh_ema_copy(ema[name], network, network)
    pipeline = CDRLPipeline(
        ebm=ebm, initializer=init, scheduler=CDRLScheduler.from_training_config(cfg)
    )
    pipeline.set_progress_bar_config(disable=True)
    if condition_sizes:  # as the run's own export: offsets for negation="posterior"
        calibrate_on_dataset(
            pipeline, dataset, cfg.data.scale, num_samples=calibration_samples, seed=cfg.train.seed
        )
    return pipeline, cfg, step
