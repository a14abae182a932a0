"""Where the digits EBM's bits/dim come from, and whether they converge (issue 17).

For a trained pipeline, the variational bound of ``cdrl.evaluation.likelihood.negative_log_likelihood`` on dequantized test
digits (17 levels, ``cdrl.evaluation.likelihood.dequantize``: x' = (k + u) / 17 * 2 - 1, u ~ U[0, 1); NLL = -log p(x') +
D log(17 / 2), bits/dim = NLL / (D ln 2); the same convention as ``experiments/density_baselines.py``), with
every level's AIS run at several annealing budgets K (same seed, so the forward-diffused x_{1:T-1} and the
dequantization are shared between budgets). Prints each level's mean term in nats and its standard error
over examples, per K, and the total in bits/dim, so the non-converging level shows itself: the convergence
criterion of the issue is |bpd(4K) - bpd(K)| < 1% of bpd(K).

Usage:
  python experiments/density_study.py --checkpoint RUN/pipeline --num_examples 16 --K 25 100 \
      --output study.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from cdrl.config import DataConfig
from cdrl.data import load_dataset
from cdrl.evaluation.bpd import dequantize, fit_level_variances
from cdrl.evaluation.likelihood import (
    gaussian_level_terms,
    negative_log_likelihood,
    top_level_base,
    top_level_log_normalizer,
)
from cdrl.pipeline import CDRLPipeline
from cdrl.sampling import frozen
from cdrl.utils import randn_like

NUM_BINS = 17


def test_digits(num_examples: int | None, seed: int) -> torch.Tensor:
    """(n, 1, 8, 8) test digits in [-1, 1]; a seeded random subset when num_examples is given."""
    dataset = load_dataset(DataConfig(name="digits"), split="test")
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    if num_examples is not None and num_examples < len(x):
        index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:num_examples]
        x = x[index.sort().values]
    return x


@torch.no_grad()
def gaussian_decoder_terms(
    pipe: CDRLPipeline, x: torch.Tensor, generator: torch.Generator, variance: float | None = None
) -> tuple[torch.Tensor, float]:
    """Level 0 as a Gaussian decoder instead of the EBM: p(x_0 | x_1) = N(m(x_1), v I), m the initializer's
    proposal mean (y-space) / sqrt(alpha_1) (``cdrl.evaluation.likelihood.gaussian_level_terms`` at t = 0,
    which ``negative_log_likelihood(..., gaussian_levels=1)`` uses). Returns each example's bound term
    -log N(x_0; m, v) + log q(x_1 | x_0) (nats, (b,)) and v. x: dequantized data in [-1, 1]; the forward
    noise eps_1 is the generator's first draw, as in ``negative_log_likelihood``. v defaults to the
    proposal's own variance (the DDPM posterior variance betatilde_1)."""
    schedule, settings = pipe.scheduler.schedule, pipe.scheduler.langevin_settings()
    x0 = x * float(pipe.scheduler.config.data_scale)
    alpha1, sigma1 = float(schedule.alphas[1]), float(schedule.sigmas[1])
    x1 = math.sqrt(alpha1) * x0 + sigma1 * randn_like(x0, generator)
    if variance is None:
        variance = float(schedule.posterior_variances[0])
    with frozen(pipe.ebm, pipe.initializer):
        quadratic, log_norm = gaussian_level_terms(
            pipe.initializer, schedule, settings, 0, x0, x1, variance=variance
        )
    return quadratic + log_norm, variance


def train_digits_dequantized(num: int = 512, seed: int = 123) -> torch.Tensor:
    dataset = load_dataset(DataConfig(name="digits"), split="train")
    x = torch.stack([dataset[i][0] for i in range(min(num, len(dataset)))])
    return dequantize(x, NUM_BINS, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def gaussian_top_terms(
    pipe: CDRLPipeline, x: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The top level as a Gaussian instead of the marginal EBM: -log N(x_{T-1}; m, s^2 I) with (m, s) the
    moments of q(x_{T-1}) over dequantized *training* digits (``cdrl.evaluation.likelihood.top_level_base``); x_{T-1}
    the same forward draw as ``negative_log_likelihood`` makes with this generator. (b,) nats."""
    schedule = pipe.scheduler.schedule
    ds = float(pipe.scheduler.config.data_scale)
    alphas, sigmas = schedule.alphas.double().tolist(), schedule.sigmas.double().tolist()
    xt = x * ds
    for t in range(schedule.num_levels - 1):
        xt = math.sqrt(alphas[t + 1]) * xt + sigmas[t + 1] * randn_like(x, generator)
    mean, std = top_level_base(schedule, train_digits_dequantized(), data_scale=ds)
    dims = x[0].numel()
    sq = (xt.double() - mean).flatten(1).pow(2).sum(1)
    return 0.5 * dims * math.log(2 * math.pi * float(std) ** 2) + sq / (2 * float(std) ** 2)


def fitted_decoder_variance(pipe: CDRLPipeline, num: int = 512, seed: int = 123) -> float:
    """The maximum-likelihood scalar variance of the level-0 Gaussian decoder on dequantized *training*
    digits: mean over pixels of (x_0 - m(x_1))^2 (``cdrl.evaluation.bpd.fit_level_variances``, one batch)."""
    dataset = load_dataset(DataConfig(name="digits"), split="train")
    x = torch.stack([dataset[i][0] for i in range(min(num, len(dataset)))])
    generator = torch.Generator().manual_seed(seed)
    return fit_level_variances(
        pipe, x, 1, num_bins=NUM_BINS, generator=generator, batch_size=len(x)
    )[0]


def study(
    pipe: CDRLPipeline,
    x0: torch.Tensor,
    budgets: list[int],
    *,
    num_chains: int = 16,
    top_num_chains: int = 256,
    base: str = "tether",
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    ebm, scheduler = pipe.ebm, pipe.scheduler
    schedule, settings = scheduler.schedule, scheduler.langevin_settings()
    data_scale = float(scheduler.config.data_scale)
    n, dims = x0.shape[0], x0[0].numel()
    offset = dims * math.log(NUM_BINS / 2)
    x = dequantize(x0, NUM_BINS, generator=torch.Generator().manual_seed(seed))
    out: dict = {"num_examples": n, "num_chains": num_chains, "top_num_chains": top_num_chains,
                 "base": base, "seed": seed, "budgets": {}}  # fmt: skip
    fitted_var = fitted_decoder_variance(pipe) if pipe.initializer is not None else None
    for K in budgets:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed + 1)
        top = top_level_log_normalizer(
            ebm, schedule, settings, x, data_scale=data_scale, num_intermediate=K,
            num_chains=top_num_chains, generator=torch.Generator().manual_seed(seed + 2),
        )  # fmt: skip
        top_log_z = float(top.log_normalizer[0])
        parts = []
        for i in range(0, n, batch_size):
            parts.append(
                negative_log_likelihood(
                    ebm,
                    schedule,
                    settings,
                    x[i : i + batch_size],
                    data_scale=data_scale,
                    base=base,
                    initializer=pipe.initializer,
                    num_intermediate=K,
                    num_chains=num_chains,
                    top_log_normalizer=top_log_z,
                    generator=gen,
                )  # fmt: skip
            )
        terms = torch.cat([p.terms for p in parts])  # (n, T)
        nll = torch.cat([p.nll for p in parts]) + offset
        bpd = nll / (dims * math.log(2))
        acc = torch.cat([p.acceptance for p in parts]).nanmean(0)
        ess = torch.cat([p.ess_fraction for p in parts]).nanmean(0)
        rec = {
            "bpd": float(bpd.mean()),
            "bpd_se": float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "term_mean": terms.mean(0).tolist(),
            "term_se": (terms.std(0) / math.sqrt(n)).tolist(),
            "log_normalizer_mean": torch.cat([p.log_normalizer for p in parts]).mean(0).tolist(),
            "energy_mean": torch.cat([p.energy for p in parts]).mean(0).tolist(),
            "top_log_normalizer": top_log_z,
            "acceptance": acc.tolist(),
            "ess_fraction": ess.tolist(),
            "seconds": round(time.perf_counter() - t0, 1),
            "bpd_per_example": bpd.tolist(),
        }
        # Level 0 replaced by a Gaussian decoder (same x_0, x_1 when n <= batch_size: one batch).
        if n <= batch_size and pipe.initializer is not None:
            for name, var in (("proposal", None), ("fitted", fitted_var)):
                g0, v = gaussian_decoder_terms(
                    pipe, x, torch.Generator().manual_seed(seed + 1), var
                )
                hybrid = (terms[:, 1:].sum(1) + g0 + parts[0].data_scale_nats + offset) / (
                    dims * math.log(2)
                )
                rec[f"hybrid_{name}"] = {
                    "variance": v,
                    "level0_term_mean": float(g0.mean()),
                    "bpd": float(hybrid.mean()),
                    "bpd_se": float(hybrid.std() / math.sqrt(n)),
                }
                print(
                    f"  level 0 as Gaussian decoder ({name} variance {v:.2e}): term {float(g0.mean()):.1f} nats, "
                    f"bpd {float(hybrid.mean()):.3f} ± {float(hybrid.std() / math.sqrt(n)):.3f}",
                    flush=True,
                )
            top_g = gaussian_top_terms(pipe, x, torch.Generator().manual_seed(seed + 1))
            both = (terms[:, 1:-1].sum(1) + g0 + top_g + parts[0].data_scale_nats + offset) / (
                dims * math.log(2)
            )
            rec["hybrid_fitted_gaussian_top"] = {
                "top_term_mean": float(top_g.mean()),
                "bpd": float(both.mean()),
                "bpd_se": float(both.std() / math.sqrt(n)),
            }
            print(
                f"  ... and the top level as a Gaussian: top term {float(top_g.mean()):.1f} nats, "
                f"bpd {float(both.mean()):.3f} ± {float(both.std() / math.sqrt(n)):.3f}",
                flush=True,
            )
        out["budgets"][str(K)] = rec
        print(f"K={K}: bpd {rec['bpd']:.3f} ± {rec['bpd_se']:.3f} ({rec['seconds']} s)", flush=True)
        print("  terms (nats): " + " ".join(f"{v:.1f}" for v in rec["term_mean"]), flush=True)
        print("  acceptance:   " + " ".join(f"{v:.2f}" for v in rec["acceptance"]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num_examples", type=int, default=16)
    parser.add_argument("--K", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--num_chains", type=int, default=16)
    parser.add_argument("--top_num_chains", type=int, default=256)
    parser.add_argument("--base", choices=("tether", "proposal"), default="tether")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = CDRLPipeline.from_pretrained(args.checkpoint)
    x0 = test_digits(args.num_examples, args.seed)
    out = study(pipe, x0, args.K, num_chains=args.num_chains, top_num_chains=args.top_num_chains,
                base=args.base, seed=args.seed)  # fmt: skip
    out["checkpoint"] = args.checkpoint
    out["sigmas"] = pipe.scheduler.schedule.sigmas.tolist()
    b2 = pipe.scheduler.langevin_settings().b2
    out["temperatures"] = [float(v) ** 2 for v in pipe.scheduler.schedule.langevin_step_sizes(b2)]
    out["b2"] = b2
    ks = [str(k) for k in args.K]
    for a, b in zip(ks, ks[1:], strict=False):
        ra, rb = out["budgets"][a], out["budgets"][b]
        print(f"K {a} -> {b}: bpd {ra['bpd']:.3f} -> {rb['bpd']:.3f} "
              f"({100 * (rb['bpd'] - ra['bpd']) / ra['bpd']:+.2f}%)")  # fmt: skip
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
