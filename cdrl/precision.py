"""Speed settings for the GPU path: bf16 autocast of network forwards, TF32, channels-last, torch.compile.

Autocast touches only the networks' ops: the Langevin state y, the recovery tether, the update and
grad_y stay float32 (STYLE 2.3: "compute energies and Langevin in fp32 even under mixed precision").
Each helper is a plain function or a thin wrapper; none changes the maths beyond the precision of the
network's matmuls and convolutions. Numerics against float32 are checked in ``tests/test_accel.py``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from cdrl.langevin import EnergyFn

Precision = Literal["no", "fp32", "bf16", "fp16"]
_DTYPES: dict[str, torch.dtype | None] = {
    "no": None,
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype for a precision name (accelerate's "no" and "fp32" both mean none)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, got {precision!r}")
    return _DTYPES[precision]


def autocast_context(
    device: torch.device | str, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type to ``dtype``; a no-op for None or float32.

    CPU autocast supports bfloat16 (and float16 on recent torch), so the bf16 path runs, slowly, in tests.
    """
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def autocast_energy_fn(energy_fn: EnergyFn, dtype: torch.dtype | None) -> EnergyFn:
    """Wrap an energy y (b, ...) -> (b,) so its network runs under autocast and the energy is float32.

    y is handed to ``energy_fn`` unchanged (float32): autocast casts copies of it for the low-precision
    ops only, so ``torch.autograd.grad(energy.sum(), y)`` is float32, and the Langevin update
    y - (s^2 / 2) grad_y U + s xi (CDRL Eq. (6)) runs in float32.
    """
    if dtype is None or dtype == torch.float32:
        return energy_fn

    def fn(y: Tensor) -> Tensor:
        with autocast_context(y.device, dtype):
            energy = energy_fn(y)
        return energy.float()

    return fn


class AutocastModule(nn.Module):
    """A network whose forward runs under autocast and whose floating outputs come back float32.

    Use it where a module, not a callable, is needed: ``cdrl.sampling.sample`` and ``frozen`` take the
    EBM and the initializer as modules. The wrapped network is ``.net``; its parameters are not copied.
    An EBM's ``context`` / ``energy`` split (which ``cdrl.sampling.energy_fn`` uses to embed the noise
    level once per chain) is exposed under autocast too, and only where the network has it; ``energy``
    comes back float32, ``context`` stays in the autocast dtype, as inside the autocast forward.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.net = net
        self.dtype = dtype

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self._run(self.net, x, *args, float32=True, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("context", "energy"):
            method = getattr(self.net, name)  # AttributeError (hasattr False) when the net has none
            return functools.partial(self._run, method, float32=name == "energy")
        return super().__getattr__(name)

    def _run(self, fn: Callable, x: Tensor, *args: Any, float32: bool, **kwargs: Any) -> Any:
        with autocast_context(x.device, self.dtype):
            out = fn(x, *args, **kwargs)
        return out.float() if float32 and out.is_floating_point() else out


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 in float32 matmuls and cuDNN convolutions on Ampere and later GPUs.

    Uses ``torch.set_float32_matmul_precision`` ("high" = TF32, "highest" = IEEE float32) and
    ``torch.backends.cudnn.allow_tf32``: the API that accelerate also uses, since mixing it with the
    newer ``fp32_precision`` attributes makes torch raise. No effect on CPU results.
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether float32 matmuls may use TF32 (see ``set_tf32``)."""
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # someone set the newer per-backend API; read that instead
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store the 4-D weights (convolutions) as NHWC, in place; returns ``model``.

    Tensor-core convolutions run NHWC natively; an NCHW input to a channels-last convolution is
    converted by the convolution itself, so callers need not change their tensors (``channels_last``
    converts them up front, once per chain, to avoid the per-call copy).
    """
    return model.to(memory_format=torch.channels_last)


def channels_last(x: Tensor) -> Tensor:
    """(b, c, h, w) as NHWC memory; other ranks unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def fold_spectral_norm(model: nn.Module) -> nn.Module:
    """Replace every parametrized weight (spectral norm) by its current value, in place; returns ``model``.

    In eval mode spectral norm divides W by sigma = u^T W v from the stored u, v with no power iteration,
    so the folded network computes the same energies as the frozen one (``cdrl.sampling.frozen``). It
    saves the per-call normalization and keeps torch.compile's guards off parametrize's cache (which
    otherwise costs a second graph per sampling call). For sampling copies only: a folded network no
    longer normalizes its weights if trained, and its state dict has plain ``weight`` keys.

    ``torch.nn.utils.parametrize.remove_parametrizations`` is not used on purpose: it deletes the property
    from the module's injected class, which ``copy.deepcopy`` shares between a module and its copies, so
    folding a copy would break the original.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for module in list(model.modules()):
            if not parametrize.is_parametrized(module):
                continue
            names = list(module.parametrizations.keys())
            values = {name: getattr(module, name).detach().clone() for name in names}
            grads = {name: module.parametrizations[name].original.requires_grad for name in names}
            del module.parametrizations
            module.__class__ = module.__class__.__bases__[0]  # this instance only
            for name, value in values.items():
                module.register_parameter(name, nn.Parameter(value, requires_grad=grads[name]))
    return model.train(was_training)


def maybe_compile(
    model: nn.Module,
    enabled: bool,
    *,
    mode: Literal["default", "reduce-overhead", "max-autotune"] | None = None,
    backend: str | Callable = "inductor",
    dynamic: bool | None = False,
    fullgraph: bool = False,
) -> nn.Module:
    """Compile ``model`` in place with torch.compile when ``enabled``; returns ``model`` either way.

    In place (``nn.Module.compile``), so parameter names, ``state_dict``, ``save_pretrained`` and
    accelerate's ``unwrap_model`` see the plain module. An EBM with a ``context`` / ``energy`` split also
    gets its ``energy`` compiled, because ``cdrl.sampling.energy_fn`` calls ``energy`` directly in every
    Langevin step. Compile after any ``copy.deepcopy`` of the model (the EMA copies).

    Compilation is lazy (it happens at the first call). ``dynamic=False`` by default: a sampler calls the
    network at one batch shape, so one graph per grad mode serves all T * K steps; a change of train/eval
    mode (spectral norm's power iteration) or of batch size compiles another. For sampling,
    ``fold_spectral_norm`` a copy first. einops registers its torch backend at its first call, which
    costs one recompilation: warm up with two calls before timing.
    """
    if not enabled:
        return model
    options = {"mode": mode, "backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
    model.compile(**options)
    if callable(getattr(model, "energy", None)) and hasattr(model, "context"):
        model.energy = torch.compile(model.energy, **options)
    return model


__all__ = [
    "AutocastModule",
    "Precision",
    "autocast_context",
    "autocast_dtype",
    "autocast_energy_fn",
    "channels_last",
    "fold_spectral_norm",
    "maybe_compile",
    "set_tf32",
    "tf32_enabled",
    "to_channels_last",
]
