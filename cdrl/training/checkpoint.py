"""Resumable checkpoints (``checkpoint-N`` in the run folder): written crash-safe, checked for
completeness, listed, resolved from --resume_from_checkpoint, and loaded safely.

A checkpoint holds accelerate's ``save_state`` (networks as safetensors; optimizers, schedulers and RNG
states as plain-data pickles), the EMAs and the persistent chains as safetensors, and ``checkpoint.json``,
written last: its step, the guard counters, the EMA settings, and every file with its size.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from cdrl.training.persistent import PersistentChains
from cdrl.training.run_dir import LEFTOVER_PREFIXES
from cdrl.training.step import TrainState
from cdrl.utils import CheckpointError, UsageError, error_line, fsync_path, is_out_of_memory
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
        marker = {"step": step, "guard": dict(guard), "ema": ema_info, "files": files}
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
