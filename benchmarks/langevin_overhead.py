"""One Langevin step against a bare forward + input-gradient backward of the same network, same batch.

Usage: python benchmarks/langevin_overhead.py [--device cpu|cuda] [--quick] [--output FILE]
       [--digits_batches 32,256] [--cifar10_batches 4] [--n_steps 10] [--rounds 7]

The Langevin side is the real ``cdrl.langevin.langevin_refine`` on ``cdrl.sampling.energy_fn`` (composed
conditioning, tempering, the recovery tether, the update, the noise), K steps per call, divided by K.
The bare side is K times ``grad_y E(y).sum()`` on a fresh leaf, with E the network's energy alone (for
an EBM with a context / energy split, ``energy`` with the context computed once, as the sampler does).
Both run frozen (eval mode, no parameter gradients, cached spectral norm), alternating round by round.
Target (issue 7): <= 10%.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import (
    SAMPLE_SHAPES,
    bare_energy,
    chain_inputs,
    device_of,
    environment,
    interleaved,
    label,
    median,
    networks,
    parse_ints,
    parser,
    report,
)

from cdrl.cli.common import run_cli
from cdrl.sampling import energy_fn, frozen, refine

TARGET = 0.10  # at most 10% over the bare pass (issue 7)


def measure(
    name: str,
    batch: int,
    device: torch.device,
    *,
    quick: bool,
    n_steps: int,
    rounds: int,
    warmup: int,
) -> dict:
    """Median seconds per step of both sides and the median of the per-round ratios."""
    cfg, ebm, _ = networks(name, device, quick=quick)
    lvl, x_next = chain_inputs(cfg, batch, SAMPLE_SHAPES[name], device)

    def bare() -> None:
        energy = bare_energy(ebm, lvl.noise_level)
        for _ in range(n_steps):
            leaf = x_next.detach().requires_grad_(True)
            torch.autograd.grad(energy(leaf).sum(), leaf)

    def chain() -> None:
        refine(energy_fn(ebm, lvl), x_next, x_next, lvl, n_steps=n_steps, noise=True)

    with frozen(ebm):
        times = interleaved(
            {"bare": bare, "langevin": chain}, rounds=rounds, warmup=warmup, device=device
        )
    ratios = [lan / bar for lan, bar in zip(times["langevin"], times["bare"], strict=True)]
    overhead = median(ratios) - 1.0
    return {
        "network": label(name, ebm, quick),
        "batch": batch,
        "n_steps": n_steps,
        "bare_ms_per_step": median(times["bare"]) / n_steps * 1e3,
        "langevin_ms_per_step": median(times["langevin"]) / n_steps * 1e3,
        "overhead": overhead,
        "overhead_min": min(ratios) - 1.0,
        "overhead_max": max(ratios) - 1.0,
        "meets_target": overhead <= TARGET,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--digits_batches", type=parse_ints, help="default: 32,256 (quick: 16)")
    p.add_argument(
        "--cifar10_batches", type=parse_ints, help="default: cpu 4, cuda 32,256 (quick: 2)"
    )
    p.add_argument(
        "--n_steps", type=int, help="Langevin steps per timed call (default 10; quick 3)"
    )
    p.add_argument("--rounds", type=int, help="timed rounds per side (default 7; quick 3)")
    args = p.parse_args(argv)
    device = device_of(args.device)
    cuda = device.type == "cuda"
    digits = args.digits_batches or ([16] if args.quick else [32, 256])
    cifar = args.cifar10_batches or ([2] if args.quick else ([32, 256] if cuda else [4]))
    n_steps = args.n_steps or (3 if args.quick else 10)
    rounds = args.rounds or (3 if args.quick else 7)

    results = []
    for name, batches in (("digits", digits), ("cifar10", cifar)):
        for batch in batches:
            results.append(
                measure(
                    name, batch, device, quick=args.quick, n_steps=n_steps, rounds=rounds, warmup=1
                )
            )
    rows = [
        (
            r["network"],
            r["batch"],
            r["n_steps"],
            f"{r['bare_ms_per_step']:.2f}",
            f"{r['langevin_ms_per_step']:.2f}",
            f"{100 * r['overhead']:+.1f}",
            f"[{100 * r['overhead_min']:+.1f}, {100 * r['overhead_max']:+.1f}]",
            "yes" if r["meets_target"] else "NO",
        )
        for r in results
    ]
    headers = (
        "network",
        "batch",
        "K",
        "bare ms/step",
        "langevin ms/step",
        "overhead %",
        "per-round range %",
        f"<= {100 * TARGET:.0f}%",
    )
    notes = [
        "bare = the EBM's energy (context computed once) + input-gradient backward; langevin = "
        "langevin_refine per step (energy_fn, tether, update, noise); overhead = median over rounds "
        "of langevin/bare - 1",
    ]
    report(
        "langevin_overhead",
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
