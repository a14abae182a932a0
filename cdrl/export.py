"""The exported pipeline folder (``save_pretrained``'s layout plus ``training_config.yaml``): write it
all at once, find it in a run folder, read its config without loading weights, load it safely.

Every problem is a ``CheckpointError`` (a ``ValueError``) naming the folder and the fix.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cdrl.calibration import calibrate_on_dataset
from cdrl.checks import check_device, network_problem
from cdrl.config import Config, ConfigError, load_config, save_config
from cdrl.data import load_dataset
from cdrl.utils import CheckpointError, atomic_write

if TYPE_CHECKING:
    from cdrl.pipeline import CDRLPipeline

TRAINING_CONFIG = "training_config.yaml"  # the run's resolved config, beside the pipeline's parts


MODEL_CARD = "README.md"  # the model card, as the Hugging Face Hub reads it


def export_pipeline(
    pipeline: CDRLPipeline,
    cfg: Config,
    folder: Path,
    *,
    step: int | None = None,
    command: str | None = None,
    figures: dict[str, float] | None = None,
) -> None:
    """save_pretrained into a temporary folder, then swap it into place (``atomic_write``: the old or the
    new export is at ``folder`` at every moment). The folder carries the training config and a model card
    (``model_card``) naming ``step``, the ``command`` and the ``figures`` measured at export."""
    with atomic_write(folder, folder=True, durable=True) as tmp:
        pipeline.save_pretrained(tmp)
        save_config(cfg, tmp / TRAINING_CONFIG)
        card = model_card(pipeline, cfg, step=step, command=command, figures=figures)
        (tmp / MODEL_CARD).write_text(card)


def model_card(
    pipeline: CDRLPipeline,
    cfg: Config,
    *,
    step: int | None = None,
    command: str | None = None,
    figures: dict[str, float] | None = None,
) -> str:
    """A Hub-style model card: YAML metadata, then what was trained, on what, how, and what was measured."""
    import cdrl

    def count(network) -> str:
        return (
            "none"
            if network is None
            else f"{sum(p.numel() for p in network.parameters()):,} parameters"
        )

    conditional = bool(pipeline.condition_sizes)
    kind = "DRL (no initializer)" if pipeline.initializer is None else "CDRL"
    shape = "x".join(map(str, pipeline.sample_shape))
    lines = [
        "---",
        "library_name: cdrl",
        "license: apache-2.0",
        "tags:",
        "- energy-based-model",
        "- cdrl",
        "- unconditional-image-generation"
        if not conditional
        else "- class-conditional-image-generation",
        "---",
        "",
        f"# {kind} model on `{cfg.data.name}`",
        "",
        f"An energy-based model trained with {'cooperative ' if kind == 'CDRL' else ''}diffusion recovery "
        f"likelihood by cdrl {cdrl.__version__}: {pipeline.scheduler.schedule.num_levels} noise levels, "
        f"samples of shape {shape}"
        + (f", conditions of sizes {list(pipeline.condition_sizes)}" if conditional else "")
        + ".",
        "",
        f"- EBM: `{type(pipeline.ebm).__name__}`, {count(pipeline.ebm)}",
        f"- initializer: `{type(pipeline.initializer).__name__}`, {count(pipeline.initializer)}"
        if pipeline.initializer is not None
        else "- initializer: none",
        f"- data: `{cfg.data.name}` (train split), data scale {cfg.data.scale}",
        f"- training: {step if step is not None else cfg.train.max_steps} optimizer steps, batch "
        f"{cfg.train.batch_size} per process"
        + (
            f" x {cfg.train.gradient_accumulation_steps} micro-batches"
            if cfg.train.gradient_accumulation_steps > 1
            else ""
        )
        + f", seed {cfg.train.seed}, Langevin K = {cfg.langevin.n_steps}",
        f"- command: `{command}`" if command else "- command: not recorded",
        "- the full settings: `training_config.yaml` in this folder",
        "",
        "## Use",
        "",
        "```python",
        "from cdrl import CDRLPipeline",
        "",
        'pipe = CDRLPipeline.from_pretrained("path/to/this/folder")',
        "images = pipe(batch_size=16).images",
        "# or, with diffusers alone (cdrl installed): the folder is a community pipeline",
        '# DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        "```",
        "",
        "## Measured at export",
        "",
    ]
    if figures:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {name} | {value:.6g} |" for name, value in figures.items()]
    else:
        lines.append("Nothing was measured at export.")
    lines += [
        "",
        "Sample quality is measured by `cdrl-evaluate` (FID, KID, IS, bits/dim), not at export.",
        "",
    ]
    return "\n".join(lines)


def resolve_checkpoint(path: str | Path) -> Path:
    """A pipeline folder (with model_index.json), or a run folder holding one in ``pipeline/``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if (path / "model_index.json").is_file():
        folder = path
    elif (path / "pipeline" / "model_index.json").is_file():
        folder = path / "pipeline"
    else:
        raise CheckpointError(
            f"{path} holds no exported pipeline (model_index.json); pass a run's pipeline/ folder, "
            "or finish training so it is exported"
        )
    for part in ("ebm", "scheduler"):
        if not (folder / part).is_dir():
            raise CheckpointError(
                f"checkpoint {folder} is incomplete: the {part}/ folder is missing"
            )
    return folder


def read_model_config(checkpoint: Path) -> dict[str, Any]:
    """The EBM's config.json of a checkpoint, read without loading any weights (to fail early)."""
    from cdrl.models import EnergyMLP, EnergyResNet

    path = checkpoint / "ebm" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(
            f"checkpoint {checkpoint} is incomplete: {path} is missing or unreadable"
        ) from None
    model_class = (
        EnergyMLP if isinstance(config, dict) and "in_features" in config else EnergyResNet
    )
    problem = network_problem(config, model_class)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    return config


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
        raise CheckpointError(
            f"checkpoint {folder} could not be loaded: {str(err).splitlines()[0]}"
        ) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipeline.to(device)
    except (RuntimeError, AssertionError) as err:
        raise CheckpointError(
            f"device {device!r} cannot be used: {str(err).splitlines()[0]}"
        ) from None
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


def calibrate_checkpoint(
    path: str | Path,
    *,
    num_samples: int = 4096,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Fit a conditional checkpoint's offsets on its training data (``training_config.yaml``) and store them
    in its ``scheduler/scheduler_config.json`` (written atomically); ``progress`` says on stderr what it
    fits before the work. Returns the pipeline folder."""
    folder = resolve_checkpoint(path)
    pipeline = load_pipeline(folder, device)
    if not pipeline.condition_sizes:
        raise CheckpointError(
            f"{folder} is an unconditional model: there are no conditions to calibrate"
        )
    config_path = folder / "training_config.yaml"
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path} not found: cdrl-calibrate needs the training config that train.py exports "
            "with the pipeline (it names the training data)"
        )
    try:
        cfg = load_config(config_path, [])
        dataset = load_dataset(cfg.data, split="train")
    except (ConfigError, OSError) as err:
        raise CheckpointError(f"{config_path}: {' '.join(str(err).split())}") from None
    if progress:
        print(
            f"calibrating on up to {num_samples:,} of {len(dataset):,} training examples at each of "
            f"{pipeline.scheduler.schedule.num_levels} levels",
            file=sys.stderr,
        )
    calibrate_on_dataset(pipeline, dataset, cfg.data.scale, num_samples=num_samples, seed=seed)
    scheduler_json = folder / "scheduler" / "scheduler_config.json"
    stored = json.loads(scheduler_json.read_text())
    stored["condition_offsets"] = pipeline.scheduler.config.condition_offsets
    with atomic_write(scheduler_json) as tmp:
        tmp.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    return folder
