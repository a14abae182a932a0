"""Argument and file checks shared by the pipeline and the CLIs: a bad value is a ValueError or TypeError
whose message names the argument (or the file and key), raised before any work.

Counts have upper bounds (``MAX_SAMPLES``, ``MAX_LANGEVIN_STEPS``, ``MAX_RESAMPLE``): a value beyond them
would exhaust memory or run for days, and is far more likely a typo than a plan.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdrl.utils import UsageError, error_line, short_repr

MAX_SAMPLES = 10_000_000  # samples per call or command (CIFAR-10 FID uses 50,000)
MAX_LANGEVIN_STEPS = 100_000  # Langevin steps per level (the papers use 15 to 30)
MAX_RESAMPLE = 1_000  # RePaint passes per level


def check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum].

    Raises:
        TypeError: not an integer (a float such as 2.0 and a bool are refused too).
        ValueError: out of range; the message gives the bound.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:,}, got {value:,}")
    return value


def check_number(name: str, value: Any, *, minimum: float | None = None) -> float:
    """``value`` as a finite float >= ``minimum``.

    Raises:
        TypeError: not a real number.
        ValueError: nan, infinite or below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value:g}")
    return value


def check_generator(generator: Any, batch_size: int) -> None:
    """None, a torch.Generator, or a list of ``batch_size`` of them.

    Raises:
        TypeError: anything else (an int seed, say).
        ValueError: a list of the wrong length.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, list | tuple):
        bad = [g for g in generator if not isinstance(g, torch.Generator)]
        if bad:
            raise TypeError(
                f"generator must hold torch.Generator objects, got {type(bad[0]).__name__}"
            )
        if len(generator) != batch_size:
            raise ValueError(
                f"generator: got {len(generator)} generators for a batch of {batch_size}"
            )
        return
    raise TypeError(
        f"generator must be a torch.Generator or a list of them (one per sample), got "
        f"{type(generator).__name__} {generator!r}; use torch.Generator().manual_seed(seed)"
    )


def check_labels(name: str, labels: Any) -> Tensor:
    """Class labels as a flat long tensor; fractional, non-finite or non-numeric values are refused.

    Raises:
        TypeError: values that are not numbers.
        ValueError: values that are not whole numbers.
    """
    try:
        values = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be integers, got {error_line(err)}") from None
    values = values.flatten()
    if values.dtype == torch.bool or not (values.is_floating_point() or _is_integer(values)):
        raise TypeError(f"{name} must be integers, got {values.dtype}")
    if values.is_floating_point():
        bad = values[~torch.isfinite(values) | (values != values.round())]
        if bad.numel():
            raise ValueError(f"{name} must be whole numbers, got {float(bad[0]):g}")
    return values.long()


def _is_integer(values: Tensor) -> bool:
    return not values.is_floating_point() and not values.is_complex()


def check_image(name: str, images: Any) -> None:
    """A tensor image batch must be floats in [0, 1] (PIL images are converted by the pipeline).

    Raises:
        TypeError: an integer tensor (a uint8 0..255 image, say).
        ValueError: values outside [0, 1] or not finite.
    """
    if not torch.is_tensor(images):
        return
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a float tensor in [0, 1], got {images.dtype}; divide 0..255 images by 255"
        )
    if images.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)})")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} holds nan or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        hint = (
            "; divide 0..255 images by 255" if high > 1 else "; map [-1, 1] images by (x + 1) / 2"
        )
        raise ValueError(f"{name} values must be in [0, 1], got [{low:g}, {high:g}]{hint}")


# ---------------------------------------------------------------- saved configs


def full_batch_problem(
    full_batch: bool, train_top: int | None, persistent_levels: int
) -> str | None:
    """What is wrong with ``train.ebm_full_batch`` beside ``train.refine_top`` and persistent chains, or None."""
    if full_batch and (train_top is None or persistent_levels):
        return "train.ebm_full_batch needs train.refine_top set and train.persistent_levels 0"
    return None


def refine_top_problem(
    num_levels: int, sample_top: int | None, train_top: int | None, tweedie: bool
) -> str | None:
    """What is wrong with ``langevin.refine_top`` (sampling) and ``train.refine_top`` together, or None."""
    if sample_top is not None and not 0 <= sample_top <= num_levels:
        return "langevin.refine_top must be in [0, schedule.num_levels] (or null: every level)"
    if train_top is None:
        return None
    if not 1 <= train_top <= num_levels:
        return "train.refine_top must be in [1, schedule.num_levels] (or null: every level)"
    if sample_top is None or sample_top > train_top:
        return (
            "train.refine_top: the EBM is trained at the noisiest train.refine_top levels only, so set "
            "langevin.refine_top to at most that (sampling must not refine the untrained levels)"
        )
    if train_top < num_levels and tweedie:
        return (
            "train.refine_top below schedule.num_levels leaves the level-0 EBM untrained: set "
            "langevin.tweedie false (the final denoising step uses it)"
        )
    return None


def scheduler_problem(config: Any) -> str | None:
    """What is wrong with a CDRLScheduler config (a scheduler_config.json's object), or None."""
    if not isinstance(config, Mapping):
        return f"it must hold a JSON object, got {type(config).__name__}"
    rules = {
        "kind": lambda v: v in ("cdrl", "drl") or "must be 'cdrl' or 'drl'",
        "num_levels": _count(1, 10_000),
        "num_diffusion_steps": _count(1, 10_000_000),
        "n_steps": _count(0, MAX_LANGEVIN_STEPS),
        "refine_top": lambda v: v is None or _count(0, 10_000)(v),
        "num_bins": lambda v: v is None or _count(2, 65_536)(v),
        "logsnr_min": _real(),
        "logsnr_max": _real(),
        "beta_start": _real(0, 1, open_low=True),
        "beta_end": _real(0, 1, open_low=True),
        "b2": _real(0, open_low=True),
        "step_scale": _real(0, open_low=True),
        "noise_scale": _real(0),
        "tweedie_b2": _real(0, open_low=True),
        "data_scale": _real(0, open_low=True),
        "clip_sample_range": _real(0, open_low=True),
        "clip_sample": _flag,
        "tempered": _flag,
        "noise": _flag,
        "tweedie": _flag,
    }
    for key, rule in rules.items():
        if key in config:
            verdict = rule(config[key])
            if verdict is not True:
                return f"{key} {verdict}, got {short_repr(config[key])}"
    top, levels = config.get("refine_top"), config.get("num_levels", 6)
    if top is not None and top > levels:
        return f"refine_top ({top}) must be at most num_levels ({levels})"
    low, high = config.get("logsnr_min", -5.1), config.get("logsnr_max", 9.8)
    if high <= low:
        return f"logsnr_max ({high}) must exceed logsnr_min ({low})"
    offsets = config.get("condition_offsets")
    if offsets is not None:
        try:
            tables = [torch.as_tensor(o, dtype=torch.float64) for o in offsets]
        except (TypeError, ValueError, RuntimeError):
            return "condition_offsets must be a list of (levels, values) tables of numbers"
        if any(t.dim() != 2 or not bool(torch.isfinite(t).all()) for t in tables):
            return "condition_offsets must be (levels, values) tables of finite numbers"
    return None


def network_problem(config: Any, model_class: type) -> str | None:
    """What is wrong with a network's config.json (its object), or None.

    Every argument of the class's ``__init__`` must be there (diffusers would silently fill a missing one
    with its default, which for ``sample_size`` samples the wrong size) with a value of its type: positive
    integers, lists of them, booleans, a dropout in [0, 1).
    """
    if not isinstance(config, Mapping):
        return f"it must hold a JSON object, got {type(config).__name__}"
    for name, parameter in inspect.signature(model_class.__init__).parameters.items():
        if name == "self":
            continue
        if name not in config:
            return f"key {name!r} is missing"
        value, default = config[name], parameter.default
        if isinstance(default, bool):
            verdict = _flag(value)
        elif isinstance(default, int):
            verdict = _count(1, 1_000_000)(value)
        elif isinstance(default, float):
            verdict = _real(0, 1, open_high=True)(value)
        elif isinstance(default, tuple):
            items = value if isinstance(value, list | tuple) else None
            element = _flag if default and isinstance(default[0], bool) else _count(1, 1_000_000)
            verdict = (
                "must be a list"
                if items is None
                else next((f"entries {v}" for v in map(element, items) if v is not True), True)
            )
        else:
            continue
        if verdict is not True:
            return f"{name} {verdict}, got {short_repr(value)}"
    return None


def finite_weights_problem(state: Mapping[str, Tensor]) -> str | None:
    """The first tensor of a state dict holding nan or infinite values, or None."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = "nan" if bool(torch.isnan(tensor).any()) else "infinite"
            return f"tensor {key} holds {kind} values"
    return None


def _count(low: int, high: int):
    def rule(value: Any):
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return ok or f"must be an integer in [{low}, {high:,}]"

    return rule


def _real(low: float | None = None, high: float | None = None, *, open_low=False, open_high=False):
    def rule(value: Any):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return "must be a finite number"
        if low is not None and (value <= low if open_low else value < low):
            return f"must be {'>' if open_low else '>='} {low:g}"
        if high is not None and (value >= high if open_high else value > high):
            return f"must be {'<' if open_high else '<='} {high:g}"
        return True

    return rule


def _flag(value: Any):
    return isinstance(value, bool) or "must be true or false"


def read_json(path: Path) -> Any:
    """A JSON file's value; ValueError naming the file when it cannot be read or parsed."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON: {error_line(err)}") from None


def check_device(device: str | torch.device | None) -> None:
    """Refuse a --device that is not a torch device, or that this machine does not have, before any work."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(
            f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(
                f"--device {device}: this machine has no usable CUDA GPU; use --device cpu"
            )
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA GPU(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(
            f"--device {device}: MPS is not available on this machine; use --device cpu"
        )
    elif parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {device}: cdrl runs on cpu, cuda or mps")
