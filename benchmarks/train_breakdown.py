"""A training iteration broken down into proposal, Langevin, EBM update, initializer update (and EMA).

Usage: python benchmarks/train_breakdown.py [--device cpu|cuda] [--quick] [--output FILE]
       [--config digits] [--batch_size N] [--iters 20] [--warmup 2] [--set key=value ...]

Times the real ``cdrl.training.step.train_step`` on batches of the configured data set, with networks,
optimizers, schedulers and EMAs built as ``cdrl.training.state`` builds them; phase boundaries come from marks
placed around ``langevin_refine`` as ``train_step`` calls it and by a post-step hook on the EBM's
optimizer (see ``_common.PhaseClock``). Data loading is not included: the batches are drawn up front.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import (
    PHASES,
    device_of,
    environment,
    load_cfg,
    make_accelerator,
    median,
    parser,
    report,
    timed_iterations,
    training_setup,
)

from cdrl.cli.common import add_config_overrides, run_cli
from cdrl.data import load_dataset
from cdrl.training.state import accelerator_precision

PHASE_NAMES = {
    "proposal": "proposal (q pair, initializer forward)",
    "langevin": "Langevin (K steps)",
    "ebm_update": "EBM update (fwd [y+; y-], losses, guard, bwd, clip, Adam)",
    "init_update": "initializer update (bwd, clip, AdamW, diagnostics)",
    "ema_update": "EMA update (both networks)",
}


def data_batches(
    cfg, n: int, device: torch.device, *, seed: int = 0
) -> tuple[list, tuple[int, ...]]:
    """``n`` random batches of the configured data set as (x0, cond) on ``device``, and its sample shape."""
    dataset = load_dataset(cfg.data, split="train")
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        index = torch.randint(len(dataset), (cfg.train.batch_size,), generator=gen).tolist()
        items = [dataset[i] for i in index]
        x0 = torch.stack([x for x, _ in items]).to(device)
        cond = torch.stack([c for _, c in items]).to(device)
        batches.append((x0, cond))
    return batches, tuple(dataset.sample_shape)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="digits", help="configs/<name>.yaml (default digits)")
    p.add_argument("--batch_size", type=int, help="default: the config's train.batch_size")
    p.add_argument("--iters", type=int, help="timed iterations (default 20; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 2; quick 1)")
    add_config_overrides(p)
    args = p.parse_args(argv)
    device = device_of(args.device)
    overrides = list(args.set)
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    cfg = load_cfg(args.config, overrides)
    if cfg.data.class_conditional:
        raise SystemExit(
            "error: this benchmark times the unconditional step; drop class_conditional"
        )
    iters = args.iters or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    accelerator = make_accelerator(device, accelerator_precision(cfg))
    cfg.train.mixed_precision = str(accelerator.mixed_precision)  # "auto" resolved, as run() does
    batches, shape = data_batches(cfg, warmup + iters, accelerator.device)
    models, emas, schedule = training_setup(cfg, shape, accelerator)
    times = timed_iterations(models, emas, schedule, cfg, accelerator, batches, warmup=warmup)

    per_phase = {name: median([t[name] for t in times]) for name in (*PHASES, "total")}
    total = per_phase["total"]
    rows = [
        (PHASE_NAMES[name], f"{1e3 * per_phase[name]:.2f}", f"{100 * per_phase[name] / total:.1f}")
        for name in PHASES
    ]
    rows.append(
        ("total (median iteration)", f"{1e3 * total:.2f}", f"{1e3 / (1e3 * total):.2f} it/s")
    )
    headers = ("phase", "ms/iter", "% of iteration")
    notes = [
        f"config {args.config}: batch {cfg.train.batch_size}, K = {cfg.langevin.n_steps}, "
        f"T = {cfg.schedule.num_levels}, mixed_precision {cfg.train.mixed_precision}; "
        f"{iters} timed iterations after {warmup} warm-up",
        "phase medians are taken separately, so they need not add up to the median total",
    ]
    refused = sum(t["refused"] for t in times)
    if refused:
        notes.append(
            f"{refused:.0f} of {len(times)} timed steps were refused by the divergence guard"
        )
    results = {
        "config": args.config,
        "batch_size": cfg.train.batch_size,
        "n_steps": cfg.langevin.n_steps,
        "median_seconds": per_phase,
        "iterations_per_second": 1.0 / total,
        "iterations": times,
    }
    report(
        "train_breakdown",
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
