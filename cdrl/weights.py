"""Safe loading of a saved pipeline: safetensors weights only (pickle files are refused, never
unpickled), checked against their configs, and configs checked for their keys, types and ranges before
diffusers reads them (``cdrl.checks``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from cdrl.checks import finite_weights_problem, network_problem, read_json, scheduler_problem
from cdrl.utils import error_line

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_pipeline_weights(folder: Path) -> None:
    """Check every network folder of a saved pipeline: safetensors weights that match its config.json.

    Each network is built from its ``config.json`` and compared with the safetensors header (names and
    shapes only; no tensor is read). ``from_pretrained`` calls this when loading failed, for a message
    that names the file.

    Raises:
        ValueError: a problem, in one line that names the file.
    """
    for _, part, model_class in networks(folder):
        require_safetensors(part)
        try:
            network = model_class.from_config(model_class.load_config(part))
        except (OSError, ValueError, TypeError, RuntimeError) as err:
            raise ValueError(
                f"{part / 'config.json'} does not describe a {model_class.__name__}: "
                f"{error_line(err)}"
            ) from None
        check_weights(network.state_dict(), part)


def check_configs(folder: Path) -> None:
    """Check a saved pipeline's configs before diffusers reads them: the scheduler's settings, and each
    network's config.json (every key there, of its type) beside safetensors weights.

    Raises:
        ValueError: a problem, naming the file and the key.
    """
    path = folder / SCHEDULER_CONFIG
    if path.is_file():
        problem = scheduler_problem(read_json(path))
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
    for _, part, model_class in networks(folder):
        require_safetensors(part)
        path = part / "config.json"
        problem = network_problem(read_json(path), model_class) if path.is_file() else None
        if problem is not None:
            raise ValueError(f"{path}: {problem}")


def networks(folder: Path) -> list[tuple[str, Path, type]]:
    """(name, folder, class) of each cdrl network listed in a pipeline's model_index.json (the classes
    are the ``SafetensorsOnly`` networks of ``cdrl.models``, looked up by name, never imported by name)."""
    classes = _network_classes()
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return []  # diffusers reports a missing or unreadable model_index.json
    if not isinstance(index, dict):
        raise ValueError(
            f"{folder / 'model_index.json'} must hold a JSON object, got {type(index).__name__}"
        )
    found = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[-1] is None:
            continue
        model_class = classes.get(str(entry[-1]))
        if isinstance(model_class, type):  # not the scheduler, which diffusers reads from JSON
            found.append((name, folder / name, model_class))
    return found


def require_safetensors(part: Path) -> None:
    if (part / WEIGHTS_NAME).is_file():
        return
    pickles = sorted(p.name for p in part.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{part} holds pickle weights ({pickles[0]}), which are never loaded: cdrl loads "
            "safetensors only; export the model again with save_pretrained"
        )
    raise ValueError(f"{part} has no weights file {WEIGHTS_NAME}")


def check_weights(expected: Mapping[str, Tensor], part: Path) -> None:
    problem = weights_mismatch(expected, part / WEIGHTS_NAME)
    if problem is not None:
        raise ValueError(
            f"{part / 'config.json'} does not match its weights {WEIGHTS_NAME}: {problem}; the "
            "config was edited or the folder mixes two models"
        )


def weights_mismatch(expected: Mapping[str, Tensor], path: str | Path) -> str | None:
    """How a safetensors file differs from a state dict (first missing, extra or reshaped tensor), or None.

    Reads the file's header only.

    Raises:
        ValueError: the file is not a readable safetensors file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {error_line(err)}") from None
    for key, tensor in expected.items():
        if key not in shapes:
            return f"{key} is missing from the weights"
        if shapes[key] != tuple(tensor.shape):
            return (
                f"{key} has shape {list(shapes[key])} in the weights but {list(tensor.shape)} in the "
                "network the config builds"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        return f"the weights hold {extra[0]}, which the network the config builds does not have"
    return None


def _network_classes() -> dict[str, type]:
    found, todo = {}, list(SafetensorsOnly.__subclasses__())
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return found


class SafetensorsOnly:
    """Mixin (listed before ``ModelMixin``) for cdrl's networks: ``from_pretrained`` loads safetensors
    weights only, checks the folder's config.json keys and the weights against the network it builds, and
    refuses non-finite weights. It guards every loading route, diffusers' own
    ``DiffusionPipeline.from_pretrained`` included, since diffusers loads each part by its class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                f"{cls.__name__} loads safetensors weights only; use_safetensors=False is refused"
            )
        kwargs["use_safetensors"] = True
        # Spectral-norm networks built on the meta device run their power iteration very slowly (30 s
        # against 2 s for the paper-size EBM), so build them on the CPU unless the caller says otherwise.
        kwargs.setdefault("low_cpu_mem_usage", False)
        part = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        local = part.is_dir()
        if local:
            require_safetensors(part)
            path = part / "config.json"
            problem = network_problem(read_json(path), cls) if path.is_file() else None
            if problem is not None:
                raise ValueError(f"{path}: {problem}")
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if local:
            state = model.state_dict()
            check_weights(state, part)
            problem = finite_weights_problem(state)
            if problem is not None:
                raise ValueError(
                    f"{part / WEIGHTS_NAME}: {problem}; the model diverged in training or the file is "
                    "damaged, so it was not loaded"
                )
        return model
