"""Sampling throughput (samples/s) of the digits networks and the paper-scale CIFAR-10 networks.

Usage: python benchmarks/throughput.py [--device cpu|cuda] [--quick] [--output FILE]
       [--digits_samples 500] [--digits_batch 250] [--cifar10_samples 2] [--cifar10_batch 2]
       [--precision fp32|bf16] [--channels_last] [--compile] [--compile_backend inductor]

Times ``cdrl.sampling.sample``, the function ``CDRLPipeline`` calls: x_T ~ N(0, I); per level the
initializer's proposal and K Langevin steps; then the Tweedie step. K is each config's sampling K
(``langevin.sample_steps``, else ``n_steps``): 15 for both, so 6 x 15 = 90 EBM gradient evaluations per
sample plus one for Tweedie. Untrained weights (the cost does not depend on them). A warm-up run with
K = 1 at the same batch shape comes first (it also triggers compilation under --compile).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence

import torch
from _common import (
    SAMPLE_SHAPES,
    device_of,
    environment,
    format_duration,
    label,
    networks,
    num_params,
    parser,
    report,
    sampling_networks,
    synchronize,
)

from cdrl.cli.common import run_cli
from cdrl.pipeline import CDRLScheduler
from cdrl.sampling import sample, total_langevin_steps

# The CIFAR-10 target: 50,000 samples in under 10 minutes on one H100.
TARGET_SAMPLES = 50_000


def measure(
    name: str,
    num_samples: int,
    batch: int,
    device: torch.device,
    *,
    quick: bool,
    precision: str,
    use_channels_last: bool,
    compile_model: bool,
    compile_backend: str = "inductor",
) -> dict:
    """Samples/s of full sampling runs in batches of ``batch`` (``num_samples`` rounded up to batches)."""
    cfg, ebm, init = networks(name, device, quick=quick)
    tag, n_ebm, n_init = label(name, ebm, quick), num_params(ebm), num_params(init)
    ebm, init = sampling_networks(
        ebm,
        init,
        precision=precision,
        use_channels_last=use_channels_last,
        compile_model=compile_model,
        compile_backend=compile_backend,
    )
    scheduler = CDRLScheduler.from_training_config(cfg)
    settings = scheduler.langevin_settings()
    schedule = scheduler.schedule
    shape = SAMPLE_SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    x_top = torch.randn(batch, *shape, generator=gen).to(device)
    sample(ebm, init, schedule, x_top, dataclasses.replace(settings, n_steps=1))  # warm-up
    n_batches = math.ceil(num_samples / batch)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        x_top = torch.randn(batch, *shape, generator=gen).to(device)
        x = sample(ebm, init, schedule, x_top, settings)
    synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{name}: non-finite samples")
    samples = n_batches * batch
    grads = total_langevin_steps(settings, schedule.num_levels) + int(settings.tweedie)
    rate = samples / seconds
    return {
        "network": tag,
        "ebm_params": n_ebm,
        "initializer_params": n_init,
        "batch": batch,
        "n_steps": settings.n_steps,
        "levels": schedule.num_levels,
        "ebm_grads_per_sample": grads,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": rate,
        "ebm_grads_per_s": rate * grads,
        "projected_s_for_50k": TARGET_SAMPLES / rate,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--digits_samples", type=int, help="default: cpu 500, cuda 20000 (quick 16)")
    p.add_argument("--digits_batch", type=int, help="default: cpu 250, cuda 5000 (quick 16)")
    p.add_argument("--cifar10_samples", type=int, help="default: cpu 2, cuda 2000 (quick 2)")
    p.add_argument("--cifar10_batch", type=int, help="default: cpu 2, cuda 500 (quick 2)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="autocast the networks (the Langevin state stays fp32)",
    )
    p.add_argument("--channels_last", action="store_true", help="NHWC weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument(
        "--compile_backend", default="inductor", help="torch.compile backend (eager: a check)"
    )
    args = p.parse_args(argv)
    device = device_of(args.device)
    cuda = device.type == "cuda"

    def pick(value: int | None, quick: int, cpu: int, gpu: int) -> int:
        return value or (quick if args.quick and not cuda else (gpu if cuda else cpu))

    plan = {
        "digits": (
            pick(args.digits_samples, 16, 500, 20000),
            pick(args.digits_batch, 16, 250, 5000),
        ),
        "cifar10": (pick(args.cifar10_samples, 2, 2, 2000), pick(args.cifar10_batch, 2, 2, 500)),
    }
    results = [
        measure(
            name,
            n,
            batch,
            device,
            quick=args.quick,
            precision=args.precision,
            use_channels_last=args.channels_last,
            compile_model=args.compile,
            compile_backend=args.compile_backend,
        )
        for name, (n, batch) in plan.items()
    ]
    rows = [
        (
            r["network"],
            r["batch"],
            f"{r['levels']} x {r['n_steps']} + 1",
            r["samples"],
            f"{r['seconds']:.1f}",
            f"{r['samples_per_s']:.3g}",
            f"{r['ebm_grads_per_s']:.3g}",
            format_duration(r["projected_s_for_50k"]),
        )
        for r in results
    ]
    headers = (
        "network",
        "batch",
        "EBM grads (T x K + 1)",
        "samples",
        "seconds",
        "samples/s",
        "EBM grads x samples /s",
        "50k samples would take",
    )
    notes = [
        f"precision {args.precision}, channels_last {args.channels_last}, compile {args.compile}"
        + (f" ({args.compile_backend})" if args.compile else ""),
    ]
    report(
        "throughput",
        environment(device),
        headers,
        rows,
        results=results,
        notes=notes,
        output=args.output,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
