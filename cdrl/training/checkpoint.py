"""Resumable checkpoints (``checkpoint-N`` in the run folder): written crash-safe, checked for
completeness, listed, resolved from --resume_from_checkpoint, and loaded safely.

A checkpoint holds accelerate's ``save_state`` (networks as safetensors; optimizers, schedulers and RNG
states as plain-data pickles), the EMAs and the persistent chains as safetensors, and ``checkpoint.json``,
written last: its step, the guard counters, the EMA settings, and every file with its size.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from cdrl.config import Config, ConfigError, load_config, to_dict
from cdrl.training.persistent import PersistentChains
from cdrl.training.run_dir import LEFTOVER_PREFIXES, RUN_MARKER
from cdrl.training.step import TrainState
from cdrl.utils import (
    CheckpointError,
    UsageError,
    atomic_write,
    error_line,
    fsync_path,
    is_out_of_memory,
    recover_replace,
    short_repr,
)
from cdrl.weights import weights_mismatch

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
CHECKPOINT_MARKER = "checkpoint.json"  # written last: a checkpoint without it is incomplete
EMA_WEIGHTS = "ema.safetensors"  # the EMA shadow weights of a checkpoint


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

    A complete checkpoint holds checkpoint.json, written last, listing every file and its size.
    """
    marker = path / CHECKPOINT_MARKER
    if not marker.is_file():
        return f"it has no {CHECKPOINT_MARKER} (it was not completely written)"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return f"its {CHECKPOINT_MARKER} is unreadable"
    problem = marker_problem(info, path)
    if problem is not None:
        return problem
    for name, size in info["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return f"its file {name} is missing or truncated"
    return None


MAX_COUNTER = 10**12  # no counter of a real run comes near this (steps, skipped steps, rollbacks)
GUARD_COUNTERS = ("skipped", "streak", "rollbacks")


def marker_problem(info: Any, path: Path) -> str | None:
    """What is wrong with a checkpoint.json's values (read from disk: checked before any is used)."""
    match = CHECKPOINT_RE.fullmatch(path.name)
    if not isinstance(info, dict):
        return f"its {CHECKPOINT_MARKER} is not a JSON object"
    step = info.get("step")
    if not _counter(step) or (match and step != int(match[1])):
        return f"its {CHECKPOINT_MARKER} says step {_brief(step)}, not the step in its name"
    if not isinstance(info.get("files"), dict) or not all(
        isinstance(name, str) and "/" not in name and _counter(size)
        for name, size in info["files"].items()
    ):
        return f"its {CHECKPOINT_MARKER} lists its files wrongly"
    guard = info.get("guard", {})
    if not isinstance(guard, dict) or set(guard) - set(GUARD_COUNTERS):
        return f"its {CHECKPOINT_MARKER} holds unknown guard counters"
    for name, value in guard.items():
        if not _counter(value):
            return f"its {CHECKPOINT_MARKER} holds guard.{name} = {_brief(value)}, not a count"
    ema = info.get("ema")
    if not isinstance(ema, dict) or not all(isinstance(v, dict) for v in ema.values()):
        return f"its {CHECKPOINT_MARKER} holds no EMA settings"
    for name, settings in ema.items():
        for key, value in settings.items():
            bad_number = isinstance(value, float) and not math.isfinite(value)
            if bad_number or (isinstance(value, int) and not -MAX_COUNTER <= value <= MAX_COUNTER):
                return f"its {CHECKPOINT_MARKER} holds ema.{name}.{key} = {_brief(value)}"
        decay = settings.get("decay", 0.0)
        if not isinstance(decay, int | float) or not 0.0 <= decay <= 1.0:
            return (
                f"its {CHECKPOINT_MARKER} holds ema.{name}.decay = {_brief(decay)}, not in [0, 1]"
            )
    return None


def _brief(value: Any) -> str:
    return short_repr(value, 40)


def _counter(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNTER


# What shapes the trained model: a resume must use the same values (the run's config.yaml holds them).
SHAPING_SECTIONS = ("schedule", "ebm", "initializer")
SHAPING_DATA = ("name", "image_size", "channels", "scale", "class_conditional", "attributes")


def resume_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first setting that shapes the model and differs between the run's config (``stored``) and the
    resumed one (``current``), both as ``cdrl.config.to_dict`` gives them; None when they agree."""
    keys = [(section, key) for section in SHAPING_SECTIONS for key in current[section]]
    keys += [("data", key) for key in SHAPING_DATA]
    for section, key in keys:
        before, now = stored.get(section, {}).get(key), current[section].get(key)
        if before != now:
            return f"{section}.{key} is {_brief(now)} now but the run was trained with {_brief(before)}"
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


def check_resume_config(output_dir: Path, cfg: Config) -> None:
    """Refuse a resume whose settings would build another model than the run trained (levels, schedule,
    networks, data and conditioning), comparing with the run's config.yaml."""
    stored_path = output_dir / RUN_MARKER
    if not stored_path.is_file():
        return  # a run that stopped before its first step: nothing was trained
    try:
        stored = to_dict(load_config(stored_path, []))
    except ConfigError as err:
        raise CheckpointError(f"{stored_path} cannot be read: {err}; resume is refused") from None
    problem = resume_mismatch(stored, to_dict(cfg))
    if problem is not None:
        raise CheckpointError(
            f"cannot resume: {problem}; resume with the run's settings (its {RUN_MARKER}) or train "
            "into a new --output_dir"
        )


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    limit: int | None,
    ema: dict[str, EMAModel],
    guard: dict[str, int],
    chains: PersistentChains | None = None,
) -> Path:
    """accelerator.save_state, the EMAs and the persistent chains into checkpoint-N, crash-safe.

    Everything goes into .tmp-checkpoint-N, is flushed to disk, is described by checkpoint.json (written
    last, with the guard counters ``guard``), and is renamed into place; an existing checkpoint-N is moved
    aside first and deleted after, as are checkpoints beyond ``limit``. A kill at any moment leaves every
    earlier checkpoint intact.
    """
    final = output_dir / f"checkpoint-{step}"
    agreed = (
        output_dir / f".tmp-checkpoint-{step}"
    )  # every process writes its part into this folder
    if accelerator.is_main_process:
        _remove_leftovers(output_dir)
        # Swapped into place when the block ends (an atomic exchange with an existing checkpoint-N).
        write = atomic_write(final, folder=True, temporary=agreed)
    else:
        write = contextlib.nullcontext(agreed)
    with write as tmp:
        accelerator.wait_for_everyone()  # the main process has made the folder
        accelerator.save_state(str(tmp))  # models (safetensors), optimizers, schedulers, RNG states
        if chains is not None:  # every process keeps its own chains
            save_file(chains.state_dict(), str(tmp / chains_file(accelerator.process_index)))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            tensors, ema_info = _ema_state(ema)
            save_file(tensors, str(tmp / EMA_WEIGHTS))
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            for name in files:
                fsync_path(tmp / name)
            marker = {"step": step, "guard": dict(guard), "ema": ema_info, "files": files}
            (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            fsync_path(tmp / CHECKPOINT_MARKER)
    if accelerator.is_main_process:
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
    for path in output_dir.glob(
        ".checkpoint-*.cdrl-*"
    ):  # atomic_write's asides (no RENAME_EXCHANGE)
        recover_replace(output_dir / path.name[1:].split(".")[0])


def load_checkpoint(
    accelerator: Accelerator, path: Path, models: TrainState, ema: dict[str, EMAModel]
) -> dict[str, int]:
    """Restore models, optimizers, schedulers, RNG states and EMAs from a checkpoint folder, safely.

    Weights come from safetensors; accelerate's pickles (optimizer, scheduler, RNG states) are opened with
    ``torch.load(weights_only=True)`` first, so that one holding anything but plain data is refused before
    accelerate reads it. The networks must match the weights (same config).

    Returns:
        The guard counters stored with the checkpoint.

    Raises:
        CheckpointError: a checkpoint that does not match the networks, or that cannot be read safely.
    """
    networks = [models.ebm] + ([models.initializer] if models.initializer is not None else [])
    names = ["ebm", "initializer"][: len(networks)]
    stored = sorted(p.name for p in path.glob("model*.safetensors"))
    expected = ["model.safetensors"] + [f"model_{i}.safetensors" for i in range(1, len(networks))]
    if stored != expected:
        raise CheckpointError(
            f"checkpoint {path} holds {len(stored)} networks ({', '.join(stored) or 'none'}) but this "
            f"config builds {len(networks)} ({' and '.join(names)}); resume with the run's config.yaml"
        )
    for name, network, file in zip(names, networks, expected, strict=True):
        problem = weights_mismatch(accelerator.unwrap_model(network).state_dict(), path / file)
        if problem is not None:
            raise CheckpointError(
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
            raise CheckpointError(
                f"checkpoint file {file} was refused: it holds more than tensors and plain numbers "
                f"(torch.load(weights_only=True): {detail}); it was not loaded"
            ) from None
    problem = rng_state_problem(path / f"random_states_{accelerator.process_index}.pkl")
    if (
        problem is not None
    ):  # accelerate would skip a bad RNG file with an info log: resume inexactly
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {problem}")
    try:
        info = json.loads((path / CHECKPOINT_MARKER).read_text())
        accelerator.load_state(str(path))
        _load_ema(ema, load_file(str(path / EMA_WEIGHTS)), info["ema"], accelerator.device)
        if models.chains is not None:  # a checkpoint without chains restarts them empty
            file = path / chains_file(accelerator.process_index)
            models.chains.load_state_dict(load_file(str(file)) if file.is_file() else {})
            models.chains.to(accelerator.device)
        return dict(info.get("guard", {}))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as err:
        if is_out_of_memory(err):
            raise
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {error_line(err)}") from None


def rng_state_problem(file: Path) -> str | None:
    """What is wrong with a process's RNG states (Python, NumPy, torch CPU and, when stored, the
    accelerator's), each tried on a throwaway generator; None when all of them would restore."""
    try:
        states = accelerate_load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as err:
        return f"{file.name} is unreadable ({error_line(err)})"
    if not isinstance(states, dict):
        return f"{file.name} does not hold the random states"
    checks = {
        "random_state": lambda v: random.Random().setstate(v),
        "numpy_random_seed": lambda v: np.random.RandomState().set_state(v),
        "torch_manual_seed": lambda v: torch.Generator().set_state(v),
    }
    for key, restore in checks.items():
        if key not in states:
            return f"{file.name} lacks {key}"
        try:
            restore(states[key])
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            return f"{file.name} holds a {key} that cannot be restored ({error_line(err)})"
    step = states.get("step", 0)
    if not _counter(step):
        return f"{file.name} holds step = {_brief(step)}, not a count"
    for key, value in states.items():
        if key.startswith("torch_") and key != "torch_manual_seed" and torch.cuda.is_available():
            expected = torch.cuda.get_rng_state_all()
            shapes = [tuple(t.shape) for t in value] if isinstance(value, list) else None
            if shapes != [tuple(t.shape) for t in expected][: len(shapes or [])]:
                return f"{file.name} holds a {key} of the wrong shape"
    return None


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


def load_for_export(
    path: Path, networks: dict[str, torch.nn.Module]
) -> tuple[int, dict[str, EMAModel]]:
    """Read checkpoint ``path`` (RUN/checkpoint-N) for an export, changing nothing on disk and with no
    accelerator: each network of ``networks`` ("ebm", and "init" with an initializer, built from the run's
    config) gets its saved state (model*.safetensors, checked against it first), and the returned EMAs,
    keyed the same, hold the EMA weights of ema.safetensors. Nothing is unpickled.

    Returns:
        The checkpoint's step, and the EMAs.

    Raises:
        CheckpointError: not a complete checkpoint-N folder, or weights that do not match the networks.
    """
    from safetensors import SafetensorError

    match = CHECKPOINT_RE.fullmatch(path.name)
    if not path.is_dir() or not match:
        raise CheckpointError(f"{path} is not a checkpoint-N folder of a run")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    names = list(networks)
    expected = ["model.safetensors"] + [f"model_{i}.safetensors" for i in range(1, len(names))]
    stored = sorted(p.name for p in path.glob("model*.safetensors"))
    if stored != expected:
        raise CheckpointError(
            f"checkpoint {path} holds {len(stored)} networks ({', '.join(stored) or 'none'}) but its "
            f"run's config.yaml builds {len(names)}"
        )
    try:
        for name, file in zip(names, expected, strict=True):
            network = networks[name]
            mismatch = weights_mismatch(network.state_dict(), path / file)
            if mismatch is not None:
                raise CheckpointError(
                    f"checkpoint {path} does not match its run's config.yaml: {file} ({name}): {mismatch}"
                )
            network.load_state_dict(load_file(str(path / file)))
        info = json.loads((path / CHECKPOINT_MARKER).read_text())
        ema = {name: EMAModel(network.parameters()) for name, network in networks.items()}
        _load_ema(ema, load_file(str(path / EMA_WEIGHTS)), info["ema"], torch.device("cpu"))
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error_line(err)}") from None
    return int(match[1]), ema
