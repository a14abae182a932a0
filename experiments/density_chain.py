"""The initializer chain's exact bound on the digits (issue 17): how far Gaussian conditionals get at T levels.

A CDRL model holds two chains over the same levels: the EBMs' recovery conditionals, whose normalizers
need AIS (``experiments/density_study.py``), and the initializers' Gaussian proposals. Scored as a
generative chain with a fitted variance per level,

    p(x_t | x_{t+1}) = N(m_t(x_{t+1}), v_t I),   m_t = mu_phi(x_{t+1}, t) / sqrt(alpha_{t+1}),

the initializers give DDPM's bound (Ho et al. 2020, Eq. (5)) exactly, with no annealing:

    -log p(x_0) <= E_q[-log p(x_{T-1}) + sum_{t<T-1} (-log N(x_t; m_t, v_t I) + log q(x_{t+1} | x_t))],

x_{1:T-1} drawn from the forward chain. The top level p(x_{T-1}) is the Gaussian with the moments of
q(x_{T-1}) over the training digits (``cdrl.evaluation.likelihood.top_level_base``). v_t is the
maximum-likelihood variance on dequantized *training* digits (mean over pixels of (x_t - m_t)^2), never
fitted on the test digits. It is the floor the EBM's conditionals must beat at the same T: a Gaussian
per level with the initializer's mean, which is the analytic posterior-mean regression
(``train.init_data_target: posterior_mean``).

Convention as ``experiments/density_baselines.py``: 17-level digits dequantized x' = (k + u) / 17 * 2 - 1,
bits/dim = (-log p(x') + D log(17 / 2)) / (D ln 2); the package's 1,437 / 360 split.

Usage:
  python experiments/density_chain.py --checkpoint RUN/pipeline --draws 4 --output chain.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from cdrl.config import DataConfig
from cdrl.data import load_dataset
from cdrl.evaluation.bpd import dequantize
from cdrl.evaluation.likelihood import top_level_base
from cdrl.guidance import composed
from cdrl.pipeline import CDRLPipeline
from cdrl.sampling import frozen, level
from cdrl.utils import randn_like

NUM_BINS = 17


def digits(split: str) -> torch.Tensor:
    """(n, 1, 8, 8) digits of the package's split, in [-1, 1] on the 17-point grid."""
    dataset = load_dataset(DataConfig(name="digits"), split=split)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def forward_chain(x0: torch.Tensor, schedule, generator: torch.Generator) -> list[torch.Tensor]:
    """x_0, x_1, ..., x_{T-1} from q: x_{t+1} = sqrt(alpha_{t+1}) x_t + sigma_{t+1} eps."""
    alphas, sigmas = schedule.alphas.double().tolist(), schedule.sigmas.double().tolist()
    xs = [x0]
    for t in range(schedule.num_levels - 1):
        xs.append(math.sqrt(alphas[t + 1]) * xs[-1] + sigmas[t + 1] * randn_like(x0, generator))
    return xs


@torch.no_grad()
def level_means(pipe: CDRLPipeline, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """m_t(x_{t+1}) for t = 0 .. T-2: the initializer's proposal mean mapped back to x_t."""
    schedule, settings = pipe.scheduler.schedule, pipe.scheduler.langevin_settings()
    alphas = schedule.alphas.double().tolist()
    means = []
    with frozen(pipe.ebm, pipe.initializer):
        for t in range(schedule.num_levels - 1):
            idx = torch.full((xs[0].shape[0],), t, dtype=torch.long)
            lvl = level(schedule, idx, settings)
            mu = composed(pipe.initializer, xs[t + 1], lvl.next_noise_level, null=None)
            means.append(mu / math.sqrt(alphas[t + 1]))
    return means


def fit_variances(pipe: CDRLPipeline, x_train: torch.Tensor, seed: int) -> list[float]:
    """v_t: the mean over training pixels of (x_t - m_t)^2, one dequantization and forward draw."""
    gen = torch.Generator().manual_seed(seed)
    x0 = dequantize(x_train, NUM_BINS, generator=gen) * float(pipe.scheduler.config.data_scale)
    xs = forward_chain(x0, pipe.scheduler.schedule, gen)
    means = level_means(pipe, xs)
    return [float((xs[t] - m).double().pow(2).mean()) for t, m in enumerate(means)]


@torch.no_grad()
def chain_terms(
    pipe: CDRLPipeline, x: torch.Tensor, variances: list[float], top: tuple, gen: torch.Generator
) -> torch.Tensor:
    """(n, T) nats: level t's term of the bound (t < T-1) and the top's -log N(x_{T-1}) (column T-1), for
    digits x (n, 1, 8, 8) on the grid, dequantized here with ``gen``."""
    schedule = pipe.scheduler.schedule
    sigmas = schedule.sigmas.double().tolist()
    alphas = schedule.alphas.double().tolist()
    x0 = dequantize(x, NUM_BINS, generator=gen) * float(pipe.scheduler.config.data_scale)
    xs = forward_chain(x0, schedule, gen)
    means = level_means(pipe, xs)
    dims = x0[0].numel()
    cols = []
    for t, (m, v) in enumerate(zip(means, variances, strict=True)):
        model = (xs[t] - m).flatten(1).double().pow(2).sum(1) / (2 * v)
        model += 0.5 * dims * math.log(2 * math.pi * v)
        fwd = (xs[t + 1] - math.sqrt(alphas[t + 1]) * xs[t]).flatten(1).double().pow(2).sum(1)
        fwd = fwd / (2 * sigmas[t + 1] ** 2) + 0.5 * dims * math.log(2 * math.pi * sigmas[t + 1] ** 2)
        cols.append(model - fwd)  # -log p(x_t | x_{t+1}) + log q(x_{t+1} | x_t)
    mean, std = top
    s2 = float(std) ** 2
    sq = (xs[-1].double() - mean.double()).flatten(1).pow(2).sum(1)
    cols.append(0.5 * dims * math.log(2 * math.pi * s2) + sq / (2 * s2))
    return torch.stack(cols, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="an exported pipeline folder")
    parser.add_argument("--draws", type=int, default=4, help="dequantization and forward draws R")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    pipe = CDRLPipeline.from_pretrained(args.checkpoint)
    if pipe.initializer is None:
        print(f"error: {args.checkpoint} has no initializer; use a CDRL model", file=sys.stderr)
        return 2
    ds = float(pipe.scheduler.config.data_scale)
    x_train, x_test = digits("train"), digits("test")
    variances = fit_variances(pipe, x_train, seed=10_000 + args.seed)
    gen = torch.Generator().manual_seed(20_000 + args.seed)
    top = top_level_base(pipe.scheduler.schedule, dequantize(x_train, NUM_BINS, generator=gen), data_scale=ds)
    dims = x_test[0].numel()
    offset = dims * math.log(NUM_BINS / 2) - dims * math.log(ds)
    draws = []
    for r in range(args.draws):
        gen = torch.Generator().manual_seed(args.seed * 1000 + r)
        draws.append(chain_terms(pipe, x_test, variances, top, gen))
    terms = torch.stack(draws)  # (R, n, T)
    per_digit = (terms.sum(2).mean(0) + offset) / (dims * math.log(2))  # (n,)
    per_draw = (terms.sum(2).mean(1) + offset) / (dims * math.log(2))  # (R,)
    n = per_digit.numel()
    out = {
        "checkpoint": str(args.checkpoint),
        "num_levels": pipe.scheduler.schedule.num_levels,
        "num_test": n,
        "draws": args.draws,
        "seed": args.seed,
        "bpd": float(per_digit.mean()),
        "bpd_se_test": float(per_digit.std() / math.sqrt(n)),
        "bpd_sd_draws": float(per_draw.std()) if args.draws > 1 else float("nan"),
        "variances": variances,
        "term_mean": terms.mean((0, 1)).tolist(),
    }
    print(
        f"T = {out['num_levels']}: initializer chain {out['bpd']:.3f} bits/dim "
        f"(se over {n} test digits {out['bpd_se_test']:.3f}, sd over {args.draws} draws {out['bpd_sd_draws']:.3f})"
    )
    print("terms (nats), level 0 .. top: " + " ".join(f"{v:.1f}" for v in out["term_mean"]))
    print("variances: " + " ".join(f"{v:.2e}" for v in variances))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
