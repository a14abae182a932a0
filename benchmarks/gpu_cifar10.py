"""Paper-scale CIFAR-10 on one GPU: training it/s, sampling throughput, share of the bf16 peak, 50k time.

Usage, on the GPU machine (defaults: bf16 autocast, TF32, channels-last, no compile):
    python benchmarks/gpu_cifar10.py [--output FILE] [--precision bf16|fp32] [--no-tf32]
        [--no-channels_last] [--compile] [--batch_sizes 32,128] [--train_iters 10]
        [--sample_batch 500] [--sample_batches 4] [--peak_tflops 989] [--set key=value ...]
CPU fallback (no GPU): python benchmarks/gpu_cifar10.py --device cpu --quick   (reduced widths, tiny
batches: it checks the script, not the speed).

Training: the real ``cdrl.training.step.train_step`` (K = 15 Langevin steps, T = 6) with accelerate's
mixed_precision (bf16: every network forward autocast, outputs float32) and, by default, its Langevin
energy autocast too (``--no-bf16_langevin`` leaves it as train.py has it; see benchmarks/README.md);
the Langevin state and grad_y stay float32. Networks, optimizers and EMAs are built as ``cdrl.training.state``
builds them; random data.
Sampling: ``cdrl.sampling.sample`` (90 EBM gradient evaluations + Tweedie per sample) on networks
prepared by ``cdrl.precision`` (spectral norm folded, channels-last, compile, ``AutocastModule``).
FLOPs: FlopCounterMode counts of one EBM gradient evaluation, one EBM update (forward on [y+; y-] and
full backward) and the initializer's forward (+ backward in training) at batch 2, scaled linearly
(exact for these networks). Achieved TFLOP/s = FLOPs / time; share = achieved / --peak_tflops (dense
bf16: H100 SXM 989, H100 PCIe 756, H200 989, A100 312). Target (issue 7): 50,000 samples in < 10 min.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

import torch
from _common import (
    PHASES,
    QUICK_CIFAR10,
    SAMPLE_SHAPES,
    chain_inputs,
    count_flops,
    device_of,
    ebm_step_flops,
    environment,
    eval_networks,
    format_duration,
    langevin_autocast,
    load_cfg,
    make_accelerator,
    median,
    num_params,
    parse_ints,
    parser,
    random_batches,
    report,
    sampling_networks,
    synchronize,
    timed_iterations,
    training_setup,
)

from cdrl import precision as prec
from cdrl.cli.common import add_config_overrides, run_cli
from cdrl.config import Config
from cdrl.pipeline import CDRLScheduler
from cdrl.sampling import sample

SHAPE = SAMPLE_SHAPES["cifar10"]
TARGET_SAMPLES, TARGET_SECONDS = 50_000, 600.0  # issue 7: 50,000 samples in under 10 minutes


def flop_counts(cfg: Config, device: torch.device) -> dict[str, float]:
    """FLOPs per example of the pieces of an iteration and of a sample (counted at batch 2, / 2)."""
    ebm, init = eval_networks(cfg, SHAPE, device)
    lvl, x_next = chain_inputs(cfg, 2, SHAPE, device)
    grad_eval = ebm_step_flops(ebm, x_next, lvl.noise_level) / 2

    def ebm_update() -> None:  # forward on [y+; y-] and the full backward, as train_step does
        both = torch.cat([x_next, x_next])
        ebm(both, torch.cat([lvl.noise_level, lvl.noise_level])).sum().backward()

    def init_forward() -> None:
        with torch.no_grad():
            init(x_next, lvl.next_noise_level)

    def init_update() -> None:
        init(x_next, lvl.next_noise_level).sum().backward()

    ebm.train()
    counts = {
        "ebm_params": num_params(ebm),
        "init_params": num_params(init),
        "ebm_grad_eval": grad_eval,
        "ebm_update": count_flops(ebm_update) / 2,
        "init_forward": 0.0,
        "init_update": 0.0,
    }
    if init is not None:
        init.train()
        counts["init_forward"] = count_flops(init_forward) / 2
        counts["init_update"] = count_flops(init_update) / 2
    return counts


def train_rates(
    cfg: Config,
    device: torch.device,
    precision: str,
    *,
    iters: int,
    warmup: int,
    use_channels_last: bool,
    compile_model: bool,
    compile_backend: str,
    bf16_langevin: bool = True,
) -> dict:
    """Median seconds per phase and per iteration of the real train_step at cfg's batch size."""
    accelerator = make_accelerator(device, "bf16" if precision == "bf16" else "no")

    def prepare(net: torch.nn.Module) -> torch.nn.Module:
        if use_channels_last:
            net = prec.to_channels_last(net)
        return prec.maybe_compile(net, compile_model, backend=compile_backend)

    models, emas, schedule = training_setup(cfg, SHAPE, accelerator, prepare_model=prepare)
    batches = random_batches(warmup + iters, cfg.train.batch_size, SHAPE, accelerator.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dtype = torch.bfloat16 if precision == "bf16" and bf16_langevin else None
    with langevin_autocast(dtype):
        times = timed_iterations(models, emas, schedule, cfg, accelerator, batches, warmup=warmup)
    out = {name: median([t[name] for t in times]) for name in (*PHASES, "total")}
    out["refused_steps"] = sum(t["refused"] for t in times)
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def sample_rate(
    cfg: Config,
    device: torch.device,
    precision: str,
    *,
    batch: int,
    n_batches: int,
    use_channels_last: bool,
    compile_model: bool,
    compile_backend: str,
) -> dict:
    """Samples/s of full sampling runs (after a warm-up run with K = 1 at the same batch shape)."""
    ebm, init = eval_networks(cfg, SHAPE, device)
    ebm, init = sampling_networks(
        ebm,
        init,
        precision=precision,
        use_channels_last=use_channels_last,
        compile_model=compile_model,
        compile_backend=compile_backend,
    )
    scheduler = CDRLScheduler.from_training_config(cfg)
    settings, schedule = scheduler.langevin_settings(), scheduler.schedule
    gen = torch.Generator().manual_seed(0)
    x_top = torch.randn(batch, *SHAPE, generator=gen).to(device)
    for _ in range(2):  # two warm-up runs: compilation, and einops' one recompilation
        sample(ebm, init, schedule, x_top, dataclasses.replace(settings, n_steps=1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        x_top = torch.randn(batch, *SHAPE, generator=gen).to(device)
        x = sample(ebm, init, schedule, x_top, settings)
    synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(x).all():
        raise FloatingPointError("non-finite CIFAR-10 samples")
    out = {
        "samples": batch * n_batches,
        "seconds": seconds,
        "samples_per_s": batch * n_batches / seconds,
        "ebm_grads_per_sample": settings.n_steps * schedule.num_levels + int(settings.tweedie),
        "levels": schedule.num_levels,
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: cuda bf16, cpu fp32")
    p.add_argument(
        "--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls (cuda)"
    )
    p.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC weights (default: on for cuda)",
    )
    p.add_argument(
        "--bf16_langevin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --precision bf16, also autocast train_step's Langevin energy (see README)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend")
    p.add_argument(
        "--batch_sizes", type=parse_ints, help="training batches (default 32,128; quick 2,4)"
    )
    p.add_argument(
        "--train_iters", type=int, help="timed iterations per batch (default 10; quick 2)"
    )
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 3; quick 1)")
    p.add_argument("--sample_batch", type=int, help="sampling batch (default: cuda 500, cpu 2)")
    p.add_argument(
        "--sample_batches", type=int, help="timed sampling batches (default: cuda 4, cpu 1)"
    )
    p.add_argument(
        "--peak_tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)"
    )
    add_config_overrides(p)
    args = p.parse_args(argv)
    device = device_of(args.device)
    cuda = device.type == "cuda"
    precision = args.precision or ("bf16" if cuda else "fp32")
    use_cl = args.channels_last if args.channels_last is not None else cuda
    if cuda:
        precision.set_tf32(args.tf32)
    small = args.quick or not cuda
    batch_sizes = args.batch_sizes or ([2, 4] if args.quick else ([32, 128] if cuda else [2]))
    iters = args.train_iters or (2 if small else 10)
    warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    sample_batch = args.sample_batch or (500 if cuda and not args.quick else 2)
    n_batches = args.sample_batches or (4 if cuda and not args.quick else 1)
    base = [*(QUICK_CIFAR10 if args.quick else ()), *args.set]
    cfg = load_cfg("cifar10", base)
    flops = flop_counts(cfg, device)
    K = cfg.langevin.n_steps
    per_example_iter = (
        K * flops["ebm_grad_eval"]
        + flops["ebm_update"]
        + flops["init_forward"]
        + flops["init_update"]
    )
    options = dict(
        use_channels_last=use_cl, compile_model=args.compile, compile_backend=args.compile_backend
    )

    # Training iterations/s at each batch size.
    results: dict = {
        "settings": {
            "precision": precision,
            "tf32": bool(args.tf32 and cuda),
            "channels_last": use_cl,
            "bf16_langevin_in_training": precision == "bf16" and args.bf16_langevin,
            "compile": args.compile,
            "peak_tflops": args.peak_tflops,
            "overrides": base,
        },
        "flops_per_example": flops,
        "train": [],
        "sample": None,
    }
    rows = []
    for b in batch_sizes:
        cfg_b = load_cfg("cifar10", [*base, f"train.batch_size={b}"])
        t = train_rates(
            cfg_b,
            device,
            precision,
            iters=iters,
            warmup=warmup,
            bf16_langevin=args.bf16_langevin,
            **options,
        )
        tflops = per_example_iter * b / t["total"] / 1e12
        results["train"].append(
            {"batch": b, **t, "iterations_per_s": 1 / t["total"], "tflops": tflops}
        )
        rows.append(
            (
                f"train b={b}",
                f"{1 / t['total']:.3g} it/s",
                f"{1e3 * t['total']:.1f}",
                f"{100 * t['langevin'] / t['total']:.0f}% Langevin",
                f"{tflops:.3g}",
                f"{100 * tflops / args.peak_tflops:.2f}",
                "",
                _mem(t),
            )
        )

    # Sampling throughput and the 50k projection.
    s = sample_rate(cfg, device, precision, batch=sample_batch, n_batches=n_batches, **options)
    per_sample = (
        s["ebm_grads_per_sample"] * flops["ebm_grad_eval"] + s["levels"] * flops["init_forward"]
    )
    tflops = per_sample * s["samples_per_s"] / 1e12
    projected = TARGET_SAMPLES / s["samples_per_s"]
    meets = projected < TARGET_SECONDS
    results["sample"] = {
        **s,
        "batch": sample_batch,
        "flops_per_sample": per_sample,
        "tflops": tflops,
        "projected_s_for_50k": projected,
        "meets_target": meets,
    }
    rows.append(
        (
            f"sample b={sample_batch}",
            f"{s['samples_per_s']:.3g} samples/s",
            f"{1e3 * s['seconds'] / n_batches:.0f} per batch",
            f"{s['ebm_grads_per_sample']} EBM grads/sample",
            f"{tflops:.3g}",
            f"{100 * tflops / args.peak_tflops:.2f}",
            format_duration(projected),
            _mem(s),
        )
    )

    sizes = f"EBM {flops['ebm_params'] / 1e6:.1f}M, initializer {flops['init_params'] / 1e6:.2f}M"
    notes = (
        []
        if cuda
        else [
            "no GPU in use: CPU fallback"
            + ("" if args.quick else " at paper scale (very slow; --quick checks the script)")
        ]
    )
    notes += [
        f"networks: {sizes}{' (reduced: --quick)' if args.quick else ''}; K = {K}, "
        f"T = {cfg.schedule.num_levels}",
        f"precision {precision}, TF32 {'on' if results['settings']['tf32'] else 'off'}, channels_last "
        f"{use_cl}, compile {args.compile}"
        + (f" ({args.compile_backend})" if args.compile else "")
        + f"; % of peak against {args.peak_tflops:g} TFLOP/s",
        f"FLOPs per example: EBM gradient evaluation {flops['ebm_grad_eval'] / 1e9:.2f} G, "
        f"training iteration {per_example_iter / 1e9:.1f} G, sample {per_sample / 1e9:.0f} G",
        f"target: {TARGET_SAMPLES} samples in < {TARGET_SECONDS / 60:.0f} min: projected "
        f"{format_duration(projected)} -> {'met' if meets else 'NOT met'}"
        + ("" if cuda else " (CPU fallback: not the H100 figure)"),
    ]
    refused = sum(t["refused_steps"] for t in results["train"])
    if refused:
        notes.append(f"{refused:.0f} timed training steps were refused by the divergence guard")
    if precision == "bf16":
        notes.append(
            "training Langevin energy: "
            + ("bf16 autocast (patched in)" if args.bf16_langevin else "as train.py has it")
        )
    results["networks"] = sizes
    headers = ("what", "rate", "ms", "detail", "TFLOP/s", "% of peak", "50k samples", "peak GiB")
    report(
        "gpu_cifar10",
        environment(device),
        headers,
        rows,
        results=results,
        notes=notes,
        output=args.output,
    )
    return 0


def _mem(result: dict) -> str:
    return f"{result['peak_memory_gib']:.1f}" if "peak_memory_gib" in result else "n/a"


if __name__ == "__main__":
    sys.exit(run_cli(main))
