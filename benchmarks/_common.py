"""Shared by the benchmark scripts: flags, timing, tables and JSON, the networks under test, phase marks.

Not a test helper: benchmarks print figures and never assert on time (issue 7). Each script imports this
file by name (``python benchmarks/NAME.py`` puts ``benchmarks/`` first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cdrl.config import Config, load_config
from cdrl.models import build_models
from cdrl.sampling import Level, frozen, level
from cdrl.schedule import NoiseSchedule
from cdrl.training.state import build_training, noise_schedule

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}
# --quick on CPU swaps the paper-scale CIFAR-10 networks (34.8M + 3.8M) for narrow ones of the same
# structure, so the scripts run in seconds; every table names the networks it measured.
QUICK_CIFAR10 = (
    "ebm.base_channels=16",
    "ebm.num_res_blocks=1",
    "initializer.block_out_channels=[16,16,16]",
    "initializer.layers_per_block=1",
    "initializer.norm_num_groups=8",
    "initializer.attention_head_dim=8",
)


# ----------------------------------------------------------------------------------------------------------
# Flags and environment.


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes: --device, --quick, --output."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default=default, help=f"default: {default}")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--output", type=Path, help="also write the figures as JSON here")
    return p


def device_of(name: str) -> torch.device:
    """The torch device for --device; a clear error when CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures depend on: device, threads, versions."""
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


# ----------------------------------------------------------------------------------------------------------
# Timing.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call of ``fn``, queued device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], Any]], *, rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Time each function once per round, alternating, so that load from other jobs hits all alike.

    Returns seconds per call, per function, ``rounds`` values each (after ``warmup`` untimed rounds).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls and convolutions ``fn`` runs, by FlopCounterMode.

    ``fn`` must not call ``torch.autograd.grad``: FlopCounterMode's module tracker does not support it,
    so callers count the same work with ``.backward()`` into a leaf (identical kernels).
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------------
# Networks and chain inputs.


def load_cfg(name: str, overrides: Sequence[str] = ()) -> Config:
    """A config by name (``digits`` is configs/digits.yaml) or by path, with ``key=value`` overrides."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = ROOT / "configs" / f"{name}.yaml"
    return load_config(path, list(overrides))


def networks(
    name: str,
    device: torch.device,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    seed: int = 0,
) -> tuple[Config, nn.Module, nn.Module | None]:
    """(config, EBM, initializer) for configs/<name>.yaml ("digits" or "cifar10").

    cifar10 is the paper-scale pair (EnergyResNet 34.8M, InitializerUNet 3.8M) unless ``quick``.
    """
    extra = QUICK_CIFAR10 if quick and name == "cifar10" else ()
    cfg = load_cfg(name, [*extra, *overrides])
    return (cfg, *eval_networks(cfg, SAMPLE_SHAPES[name], device, seed=seed))


def eval_networks(
    cfg: Config, sample_shape: Sequence[int], device: torch.device, *, seed: int = 0
) -> tuple[nn.Module, nn.Module | None]:
    """The EBM and initializer of ``cfg``, by ``cdrl.models.build_models``, in eval mode on ``device``.

    Untrained weights: timing, FLOPs and memory do not depend on them.
    """
    torch.manual_seed(seed)
    ebm, init = build_models(cfg, tuple(sample_shape), ())
    ebm = ebm.to(device).eval()
    init = None if init is None else init.to(device).eval()
    return ebm, init


def num_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def label(name: str, ebm: nn.Module, quick: bool) -> str:
    """'cifar10 (34.8M)' or 'cifar10 reduced (0.1M)'; the size says which network was measured."""
    reduced = " reduced" if quick and name == "cifar10" else ""
    return f"{name}{reduced} ({num_params(ebm) / 1e6:.2g}M)"


def schedule_of(cfg: Config) -> NoiseSchedule:
    """The noise schedule a training config implies (``cdrl.training.state.noise_schedule``)."""
    return noise_schedule(cfg)


def chain_inputs(
    cfg: Config,
    batch: int,
    shape: Sequence[int],
    device: torch.device,
    *,
    t: int = 3,
    seed: int = 0,
) -> tuple[Level, Tensor]:
    """The constants of level ``t`` and a noisy x_{t+1} (b, ...) drawn from q with x_0 ~ U[-1, 1]."""
    schedule = schedule_of(cfg)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, *shape, generator=gen) * 2 - 1
    _, x_next = schedule.q_pair(x0, torch.full((batch,), t), generator=gen)
    x_next = x_next.to(device)
    t_batch = torch.full((batch,), t, device=device)
    return level(schedule, t_batch, cfg.langevin), x_next


def bare_energy(ebm: nn.Module, noise_level: Tensor) -> Callable[[Tensor], Tensor]:
    """y -> the EBM's energy (b,), nothing else: the network work one Langevin step needs.

    For an EBM with a ``context`` / ``energy`` split the y-independent context is computed once here,
    as ``cdrl.sampling.energy_fn`` does once per chain; otherwise the plain forward.
    """
    if hasattr(ebm, "context"):
        context = ebm.context(noise_level)
        return lambda y: ebm.energy(y, context)
    return lambda y: ebm(y, noise_level)


def ebm_step_flops(ebm: nn.Module, y: Tensor, noise_level: Tensor) -> int:
    """FLOPs of one EBM gradient evaluation: energy + backward into the input only (params frozen)."""
    with frozen(ebm):
        energy = bare_energy(ebm, noise_level)

        def run() -> None:
            leaf = y.detach().requires_grad_(True)
            energy(leaf).sum().backward()

        return count_flops(run)


# ----------------------------------------------------------------------------------------------------------
# Training: the real train_step, with phase marks.


def make_accelerator(device: torch.device, mixed_precision: str | None = "no"):
    """A fresh single-process Accelerator on ``device`` (a script may build one per call of ``main``);
    ``mixed_precision`` None defers to the launcher, as ``cdrl.training.state.accelerator_precision`` says."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


def training_setup(
    cfg: Config,
    sample_shape: Sequence[int],
    accelerator,
    *,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    seed: int = 0,
):
    """Networks, optimizers, schedulers and EMAs as training builds them
    (``cdrl.training.state.build_training``), prepared.

    Args:
        prepare_model: applied to each network before ``accelerator.prepare`` (channels-last, compile);
            default: the config's ``train.channels_last`` and ``train.compile``, as in training.

    Returns:
        (models, emas, schedule): a ``cdrl.training.step.TrainState``, the EMA objects, the noise schedule.
    """
    torch.manual_seed(seed)
    setup = build_training(cfg, accelerator, tuple(sample_shape), prepare_model=prepare_model)
    return setup.models, list(setup.ema.values()), schedule_of(cfg)


PHASES = ("proposal", "langevin", "ebm_update", "init_update", "ema_update")


class PhaseClock:
    """Marks inside the real ``cdrl.training.step.train_step``, placed from outside it (step.py is not
    edited).

    ``cdrl.training.step.langevin_refine`` (the name train_step calls) is wrapped to mark the start and end of
    Langevin; a post-step hook on the EBM's optimizer marks the end of the EBM update. So the proposal
    is everything before Langevin (q pair, level constants, the initializer's forward); the EBM update
    everything from Langevin's end to Adam's step (forward on [y+; y-], both losses, the divergence
    guard, backward, clipping); the initializer update the rest of train_step (its backward, clipping,
    AdamW, the per-level diagnostics). Each mark synchronizes the device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        synchronize(self.device)
        self.marks[name] = time.perf_counter()

    @contextlib.contextmanager
    def installed(self, models) -> Iterator[PhaseClock]:
        import cdrl.training.step as train_module

        refine = train_module.langevin_refine

        def marked_refine(*args: Any, **kwargs: Any) -> Tensor:
            self.mark("langevin_start")
            out = refine(*args, **kwargs)
            self.mark("langevin_end")
            return out

        optimizer = getattr(models.ebm_opt, "optimizer", models.ebm_opt)  # accelerate wraps it
        hook = optimizer.register_step_post_hook(lambda *_: self.mark("ebm_step_end"))
        train_module.langevin_refine = marked_refine
        try:
            yield self
        finally:
            train_module.langevin_refine = refine
            hook.remove()

    def phases(self) -> dict[str, float]:
        """Seconds per phase of the last iteration (see ``PHASES``)."""
        m = self.marks
        ebm_end = m.get("ebm_step_end", m["step_end"])  # no Adam step: the guard refused the step
        if (
            "langevin_start" not in m
        ):  # train.refine_top and no refined level in the batch: no chain
            m = {**m, "langevin_start": m["start"], "langevin_end": m["start"]}
        return {
            "proposal": m["langevin_start"] - m["start"],
            "langevin": m["langevin_end"] - m["langevin_start"],
            "ebm_update": ebm_end - m["langevin_end"],
            "init_update": m["step_end"] - ebm_end,
            "ema_update": m["end"] - m["step_end"],
        }


def timed_iterations(
    models,
    emas,
    schedule: NoiseSchedule,
    cfg: Config,
    accelerator,
    batches: Sequence[tuple[Tensor, Tensor]],
    *,
    warmup: int,
) -> list[dict[str, float]]:
    """Run ``train_step`` + the EMA updates on each batch; seconds per phase for the iterations after
    ``warmup``, and ``refused`` = 1.0 where train_step's divergence guard applied no update."""
    from cdrl.training.step import train_step

    clock = PhaseClock(accelerator.device)
    out = []
    with clock.installed(models):
        for i, batch in enumerate(batches):
            clock.marks = {}
            clock.mark("start")
            result = train_step(models, batch, cfg, schedule, accelerator)
            clock.mark("step_end")
            for ema, model in zip(emas, (models.ebm, models.initializer), strict=False):
                ema.step(accelerator.unwrap_model(model).parameters())
            clock.mark("end")
            if i >= warmup:
                phases = clock.phases()
                phases["total"] = clock.marks["end"] - clock.marks["start"]
                phases["refused"] = float(getattr(result, "problem", None) is not None)
                out.append(phases)
    return out


@contextlib.contextmanager
def langevin_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """Run train_step's Langevin energy under autocast to ``dtype``: the wiring proposed for train.py.

    accelerate's mixed precision autocasts the prepared networks' ``forward`` only; since the EBM's
    context / energy split, ``cdrl.sampling.energy_fn`` calls ``energy`` directly, so without this the
    Langevin chain inside train_step runs float32 even under ``mixed_precision=bf16``. Wraps
    ``cdrl.training.step.energy_fn`` (the name train_step calls) with ``cdrl.precision.autocast_energy_fn``.
    """
    import cdrl.training.step as train_module
    from cdrl import precision as prec

    if dtype is None:
        yield
        return
    original = train_module.energy_fn

    def autocast_energy_fn(*args: Any, **kwargs: Any) -> Callable[[Tensor], Tensor]:
        return prec.autocast_energy_fn(original(*args, **kwargs), dtype)

    train_module.energy_fn = autocast_energy_fn
    try:
        yield
    finally:
        train_module.energy_fn = original


def random_batches(
    n: int, batch: int, shape: Sequence[int], device: torch.device, *, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """``n`` batches (x0 in [-1, 1], empty conditions), as an unconditional loader yields them."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            (torch.rand(batch, *shape, generator=gen) * 2 - 1).to(device),
            torch.zeros(batch, 0, dtype=torch.long, device=device),
        )
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------------------------------------
# Output.


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def report(
    name: str,
    env: dict[str, Any],
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    results: Any,
    notes: Sequence[str] = (),
    output: Path | None = None,
) -> None:
    """Print the environment line, the table and the notes; write JSON to ``output`` if given."""
    omp = env["OMP_NUM_THREADS"]
    print(
        f"# {name}: {env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"threads {env['threads']} (OMP_NUM_THREADS={omp if omp is not None else 'unset'})"
    )
    print(format_table(headers, rows))
    for note in notes:
        print(f"note: {note}")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": name, "environment": env, "results": results, "notes": list(notes)}
        output.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {output}")


def parse_ints(text: str) -> list[int]:
    """'32,128' -> [32, 128]."""
    return [int(v) for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------------------
# The GPU path's settings, applied to sampling networks.


def sampling_networks(
    ebm: nn.Module,
    init: nn.Module | None,
    *,
    precision: str = "fp32",
    use_channels_last: bool = False,
    compile_model: bool = False,
    compile_backend: str = "inductor",
) -> tuple[nn.Module, nn.Module | None]:
    """Apply ``cdrl.precision`` to networks built for sampling only (they are changed in place).

    Folded spectral norm (exact in eval mode), channels-last weights, torch.compile of the network, and
    bf16 autocast around it with float32 outputs (the Langevin state stays float32).
    """
    from cdrl import precision as prec

    dtype = prec.autocast_dtype(precision)

    def prepare(net: nn.Module | None) -> nn.Module | None:
        if net is None:
            return None
        net = prec.fold_spectral_norm(net)
        if use_channels_last:
            net = prec.to_channels_last(net)
        net = prec.maybe_compile(net, compile_model, backend=compile_backend)
        return prec.AutocastModule(net, dtype) if dtype is not None else net

    return prepare(ebm), prepare(init)


def format_duration(seconds: float) -> str:
    """'42 s', '12.5 min' or '3.1 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
