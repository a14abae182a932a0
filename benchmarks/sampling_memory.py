"""Peak memory of sampling against K, the Langevin steps per level: it should be flat (issue 7).

Usage: python benchmarks/sampling_memory.py [--device cpu|cuda] [--quick] [--output FILE]
       [--model digits|cifar10] [--batch N] [--n_steps 5,15,60]

Each K runs the whole ``cdrl.sampling.sample`` (T levels of proposal + K Langevin steps, then the
Tweedie step) in a fresh process, forked from a server that has only imported the modules, so no
allocator cache left by an earlier K hides growth. CPU: the peak resident set (VmHWM, reset through
/proc/self/clear_refs) minus the resident set just before sampling. CUDA: torch.cuda.max_memory_allocated
minus memory_allocated before sampling. Flat: the largest peak is at most 10% (plus 4 MiB of page and
allocator slack) above the smallest.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import (
    SAMPLE_SHAPES,
    device_of,
    environment,
    label,
    networks,
    parse_ints,
    parser,
    report,
    synchronize,
)

from cdrl.cli.common import run_cli
from cdrl.pipeline import CDRLScheduler
from cdrl.sampling import sample, total_langevin_steps

FLAT_REL, FLAT_ABS_MIB = 0.10, 4.0
MIB = 2**20


def _status_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes (None without /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Set VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _cpu_peak_bytes(reset: bool) -> int:
    if reset:
        return _status_bytes("VmHWM")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_in_this_process(
    name: str, batch: int, n_steps: int, device_name: str, quick: bool
) -> dict:
    """Build the networks, then sample once with K = ``n_steps`` and return the peak memory growth."""
    device = torch.device(device_name)
    cfg, ebm, init = networks(name, device, quick=quick)
    scheduler = CDRLScheduler.from_training_config(cfg)
    settings = scheduler.langevin_settings(n_steps=n_steps)
    gen = torch.Generator().manual_seed(0)
    x_top = torch.randn(batch, *SAMPLE_SHAPES[name], generator=gen).to(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, method = torch.cuda.memory_allocated(device), "cuda max_memory_allocated"
    else:
        reset = _reset_peak_rss()
        before = _status_bytes("VmRSS") if reset else _cpu_peak_bytes(False)
        method = "VmHWM after clear_refs" if reset else "ru_maxrss (peak may predate sampling)"
    start = time.perf_counter()
    sample(ebm, init, scheduler.schedule, x_top, settings)
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _cpu_peak_bytes(reset)
    return {
        "network": label(name, ebm, quick),
        "batch": batch,
        "n_steps": n_steps,
        "grad_evals": total_langevin_steps(settings, scheduler.schedule.num_levels)
        + int(settings.tweedie),
        "baseline_mib": before / MIB,
        "peak_growth_mib": max(0, peak - before) / MIB,
        "seconds": seconds,
        "method": method,
    }


def measure(name: str, batch: int, ks: Sequence[int], device: torch.device, quick: bool) -> list:
    """One fresh process per K (forkserver where the platform has it, else spawn)."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["_common", "cdrl.sampling", "cdrl.training.step"])
    results = []
    for k in ks:
        with ctx.Pool(processes=1, maxtasksperchild=1) as pool:
            args = (name, batch, k, device.type, quick)
            results.append(pool.apply(measure_in_this_process, args))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--model", choices=("digits", "cifar10"), help="default: cpu digits, cuda cifar10"
    )
    p.add_argument(
        "--batch", type=int, help="default: digits 128 (cuda 1024), cifar10 2 (cuda 256); quick 8"
    )
    p.add_argument(
        "--n_steps", type=parse_ints, default=[5, 15, 60], help="K values (default 5,15,60)"
    )
    args = p.parse_args(argv)
    device = device_of(args.device)
    cuda = device.type == "cuda"
    name = args.model or ("cifar10" if cuda else "digits")
    default_batch = {"digits": 1024 if cuda else 128, "cifar10": 256 if cuda else 2}[name]
    batch = args.batch or (8 if args.quick and not cuda else default_batch)

    results = measure(name, batch, args.n_steps, device, args.quick)
    peaks = [r["peak_growth_mib"] for r in results]
    flat = max(peaks) <= (1 + FLAT_REL) * min(peaks) + FLAT_ABS_MIB
    ks = [r["n_steps"] for r in results]
    slope = (peaks[-1] - peaks[0]) / (ks[-1] - ks[0]) if len(ks) > 1 and ks[-1] != ks[0] else 0.0
    rows = [
        (
            r["network"],
            r["batch"],
            r["n_steps"],
            r["grad_evals"],
            f"{r['baseline_mib']:.1f}",
            f"{r['peak_growth_mib']:.1f}",
            f"{r['seconds']:.1f}",
        )
        for r in results
    ]
    headers = ("network", "batch", "K", "EBM grads", "MiB before", "peak growth MiB", "seconds")
    notes = [
        f"method: {results[0]['method']}, one fresh process per K",
        f"flat (max <= {1 + FLAT_REL:.2f} x min + {FLAT_ABS_MIB:.0f} MiB): {'yes' if flat else 'NO'}; "
        f"slope {1024 * slope:+.1f} KiB per extra Langevin step",
    ]
    summary = {"runs": results, "flat": flat, "slope_mib_per_step": slope}
    report(
        "sampling_memory",
        environment(device),
        headers,
        rows,
        results=summary,
        notes=notes,
        output=args.output,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
