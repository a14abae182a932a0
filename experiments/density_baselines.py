"""Reference densities for the 8x8 digits in bits/dim (issue 17): uniform, Gaussian, Gaussian mixtures and
the diffusion baseline's variational bound, on the package's own split (``cdrl.data``: 1,437 train / 360 test).

Dequantization, stated exactly. A pixel is an integer k in {0, ..., 16} (sklearn's grey levels). It is
dequantized to z = k + u, u ~ U[0, 1) independently per pixel, so z lies in [0, 17)^D, D = 64, and for any
density p_z, -log P(k) <= E_u[-log p_z(k + u)] (Theis et al. 2016; the bins have width 1). The models see
x' = 2 z / 17 - 1 in [-1, 1) (``cdrl.evaluation.likelihood.dequantize`` with num_bins = 17, the CDRL pipelines' and the
diffusion UNet's data range); with p_x' the model density there,

    -log p_z(z) = -log p_x'(x') - D log(2 / 17)          (Jacobian of z -> x', dx'/dz = 2 / 17 per pixel)

and bits/dim = -log p_z(z) / (D ln 2). Uniform over the 17 levels is log2(17) = 4.087 bits/dim exactly.

Standard errors: "se(test)" is the standard deviation over the 360 test digits of the per-digit NLL
(averaged over the dequantization draws) / sqrt(360); "sd(draws)" is the standard deviation of the test-set
mean over the R dequantization draws (each draw also redraws the diffusion bound's forward noise).

The Gaussian and the mixtures are fitted by maximum likelihood to the dequantized training digits. For the
single Gaussian that is exact in closed form: mean = mean(k) + 1/2, covariance = cov(k) + I / 12 (the
uniform noise is independent of k), i.e. the limit of infinitely many dequantized copies. The mixtures are
fitted with sklearn's ``GaussianMixture`` (full covariances, EM) on ``--copies`` dequantized copies of the
training set; the number of components is chosen by 5-fold cross-validation on the training set only.

The diffusion bound is DDPM's (Ho et al. 2020, Eq. (5)) for ``experiments/diffusion_baseline.py``'s model:
diffusers' ``DDPMScheduler`` with N = 1000 linear betas 1e-4 .. 0.02, timesteps k = 0..N-1,
x_k = sqrt(abar_k) x' + sqrt(1 - abar_k) eps, abar_k = prod_{j <= k} (1 - beta_j) (so x_0 is already one
step of noise from the data x'). The model is p(x_{N-1}) = N(0, I), the Gaussian reverse steps
p(x_{k-1} | x_k) = N(mu_theta(x_k, k), sigma_k^2 I), k = 1..N-1, with the eps-parameterized mean
mu_theta = (x_k - beta_k / sqrt(1 - abar_k) eps_theta) / sqrt(alpha_k), and a *Gaussian decoder*
p(x' | x_0) = N(mu_theta(x_0, 0), beta_0 I) with mu_theta(x_0, 0) = (x_0 - sqrt(beta_0) eps_theta) /
sqrt(alpha_0): a density on the continuous dequantized x' (no discretized decoder: the dequantization
already turns the data continuous, and the decoder's std sqrt(beta_0) = 0.01 is far below the bin width
2 / 17 = 0.118). The bound is

    -log p(x') <= KL(q(x_{N-1} | x') || N(0, I)) + sum_{k=1}^{N-1} KL(q(x_{k-1} | x_k, x') || p(x_{k-1} | x_k))
                  - E_q log p(x' | x_0),

every KL between Gaussians in closed form; for k >= 1 the KL is
(D / 2)(log(sigma_k^2 / btilde_k) + btilde_k / sigma_k^2 - 1) + beta_k^2 / (2 sigma_k^2 alpha_k (1 - abar_k))
||eps - eps_theta(x_k, k)||^2, and the decoder term is (D / 2) log(2 pi beta_0) + ||eps - eps_theta(x_0, 0)||^2
/ (2 alpha_0). Every k is evaluated (no timestep sampling), one forward-noise draw per digit and k per
dequantization draw. Two reverse variances are reported, sigma_k^2 = beta_k ("beta") and sigma_k^2 = btilde_k
= (1 - abar_{k-1}) / (1 - abar_k) beta_k ("posterior"); each is a valid bound for its own model.

The diffusion model of ``experiments/diffusion_baseline.py`` is trained on the 17-level grid itself; at small
k its eps-prediction snaps x_k back onto that grid, which a dequantized x' is not on, so its bound on
dequantized data is dominated by the decoder and the first steps. ``--train_dequantized DIR`` trains the same
UNet with the same settings (the compare run's: batch 32, 5,857 steps, lr 1e-3, EMA 0.999, seed 0) on a pool
of ``--train_copies`` dequantized copies of the training digits instead; both bounds are reported.

Usage:
  python experiments/density_baselines.py --train_dequantized /work/runs/d17_diffdeq
  python experiments/density_baselines.py --diffusion /work/runs/compare/diffusion --draws 3 \
      --output experiments/results/density_baselines.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cdrl.config import DataConfig
from cdrl.data import load_dataset

NUM_BINS = 17
D = 64
LN2 = math.log(2.0)


def digits_levels(split: str) -> np.ndarray:
    """(n, 64) integer grey levels k in {0..16} of the package's digits split (recovered from [-1, 1])."""
    dataset = load_dataset(DataConfig(name="digits"), split=split)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))]).reshape(len(dataset), -1)
    k = torch.round((x.double() + 1.0) / 2.0 * (NUM_BINS - 1)).numpy()
    assert np.allclose(k / (NUM_BINS - 1) * 2 - 1, x.double().numpy(), atol=1e-6)
    return k


def dequantize(k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """z = k + u, u ~ U[0, 1): continuous data in [0, 17) (grey-level units, bins of width 1)."""
    return k + rng.random(k.shape)


def to_model_range(z: np.ndarray) -> np.ndarray:
    """x' = 2 z / 17 - 1 in [-1, 1); log |dx'/dz| = D log(2 / 17) per image."""
    return 2.0 * z / NUM_BINS - 1.0


JACOBIAN_NATS = D * math.log(
    2.0 / NUM_BINS
)  # log |det dx'/dz|: -log p_z = -log p_x' - JACOBIAN_NATS


def summarize(nll_draws: np.ndarray) -> dict:
    """nll_draws (R, n) nats of -log p_z per test digit and dequantization draw -> bits/dim with errors."""
    per_example = nll_draws.mean(0)
    n = per_example.shape[0]
    bpd = per_example.mean() / (D * LN2)
    se = per_example.std(ddof=1) / math.sqrt(n) / (D * LN2)
    draw_means = nll_draws.mean(1) / (D * LN2)
    sd_draws = float(draw_means.std(ddof=1)) if len(draw_means) > 1 else float("nan")
    return {
        "bpd": float(bpd),
        "se_test": float(se),
        "sd_draws": sd_draws,
        "per_draw_bpd": [float(v) for v in draw_means],
        "nll_nats": float(per_example.mean()),
    }


def gaussian_nll(z_train_levels: np.ndarray, z_test: np.ndarray) -> np.ndarray:
    """-log N(z; mu, Sigma) with the closed-form ML fit to the dequantized training set."""
    mean = z_train_levels.mean(0) + 0.5
    cov = np.cov(z_train_levels, rowvar=False, bias=True) + np.eye(D) / 12.0
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    diff = z_test - mean
    maha = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff)
    return 0.5 * (D * math.log(2 * math.pi) + logdet + maha)


def fit_gmm(z: np.ndarray, k: int, seed: int, reg: float):
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(
        n_components=k, covariance_type="full", reg_covar=reg, n_init=1, max_iter=500,
        random_state=seed,
    )  # fmt: skip
    return gmm.fit(z)


def gmm_cv(
    k_train: np.ndarray, ks: list[int], copies: int, seed: int, reg: float
) -> dict[int, float]:
    """5-fold CV on the training digits: mean held-out bits/dim per number of components."""
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(seed)
    out = {}
    folds = list(KFold(5, shuffle=True, random_state=seed).split(k_train))
    for k in ks:
        scores = []
        for tr, va in folds:
            z_tr = np.concatenate([dequantize(k_train[tr], rng) for _ in range(copies)])
            gmm = fit_gmm(z_tr, k, seed, reg)
            z_va = dequantize(k_train[va], rng)
            scores.append(-gmm.score_samples(z_va).mean() / (D * LN2))
        out[k] = float(np.mean(scores))
        print(f"  GMM CV k={k}: {out[k]:.4f} bits/dim", flush=True)
    return out


@torch.no_grad()
def diffusion_bound(
    folder: str, x: torch.Tensor, generator: torch.Generator, batch: int = 360
) -> dict:
    """Per-example DDPM bound on -log p_x'(x') in nats for both reverse variances; x (n, 1, 8, 8) in [-1, 1)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from diffusion_baseline import load_diffusion

    unet, scheduler = load_diffusion(folder)
    betas = scheduler.betas.double()
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, 0)
    num = len(betas)
    n = x.shape[0]
    sq_err = torch.zeros(n, num, dtype=torch.float64)  # ||eps - eps_theta(x_k, k)||^2
    for k in range(num):
        for i in range(0, n, batch):
            x0 = x[i : i + batch].double()
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
            xk = abar[k].sqrt() * x0 + (1 - abar[k]).sqrt() * eps
            pred = unet(xk.float(), torch.full((x0.shape[0],), k, dtype=torch.long)).sample.double()
            sq_err[i : i + batch, k] = (eps - pred).flatten(1).pow(2).sum(1)
    # Prior: KL(N(sqrt(abar) x', (1 - abar) I) || N(0, I)).
    ab = abar[-1]
    x2 = x.double().flatten(1).pow(2).sum(1)
    prior = 0.5 * (D * ((1 - ab) - 1 - torch.log(1 - ab)) + ab * x2)
    decoder = 0.5 * D * math.log(2 * math.pi * float(betas[0])) + sq_err[:, 0] / (
        2 * float(alphas[0])
    )
    ks = torch.arange(1, num)
    btilde = (1 - abar[ks - 1]) / (1 - abar[ks]) * betas[ks]
    out = {}
    for name, var in (("beta", betas[ks]), ("posterior", btilde)):
        const = 0.5 * D * (torch.log(var / btilde) + btilde / var - 1)
        coef = betas[ks] ** 2 / (2 * var * alphas[ks] * (1 - abar[ks]))
        kl = const[None, :] + coef[None, :] * sq_err[:, 1:]
        total = prior + kl.sum(1) + decoder
        out[name] = {
            "nll": total.numpy(),
            "prior": float(prior.mean()),
            "decoder": float(decoder.mean()),
            "kl_sum": float(kl.sum(1).mean()),
            # where the nats go: k = 1..9, 10..99, 100..999
            "kl_k1_9": float(kl[:, :9].sum(1).mean()),
            "kl_k10_99": float(kl[:, 9:99].sum(1).mean()),
            "kl_k100_999": float(kl[:, 99:].sum(1).mean()),
        }
    return out


def train_dequantized_diffusion(
    output_dir: str, *, copies: int, max_steps: int, batch_size: int, seed: int
):
    """``diffusion_baseline.train_diffusion`` on a pool of ``copies`` dequantized copies of the training digits
    (x' = (k + u) / 17 * 2 - 1, the data the bound scores), with the compare run's other settings."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from diffusion_baseline import train_diffusion

    rng = np.random.default_rng(seed + 100)
    k = digits_levels("train")
    pool = np.concatenate([to_model_range(dequantize(k, rng)) for _ in range(copies)])
    images = torch.from_numpy(pool).float().reshape(-1, 1, 8, 8)
    return train_diffusion(output_dir, max_steps=max_steps, images=images, batch_size=batch_size,
                           seed=seed)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3, help="dequantization draws R")
    parser.add_argument(
        "--copies", type=int, default=10, help="dequantized copies for the GMM fits"
    )
    parser.add_argument("--gmm_components", type=int, nargs="+", default=[1, 2, 3, 5, 8, 10, 15])
    parser.add_argument("--reg_covar", type=float, default=1e-6)
    parser.add_argument("--diffusion", type=str, default=None, help="diffusion_baseline run folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--train_dequantized",
        type=str,
        default=None,
        metavar="DIR",
        help="only train the diffusion baseline on dequantized digits into DIR",
    )
    parser.add_argument("--train_copies", type=int, default=50)
    parser.add_argument(
        "--train_steps", type=int, default=5857, help="the compare run's step count"
    )
    parser.add_argument("--train_batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.train_dequantized:
        summary = train_dequantized_diffusion(
            args.train_dequantized,
            copies=args.train_copies,
            max_steps=args.train_steps,
            batch_size=args.train_batch_size,
            seed=args.seed,
        )
        print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
        return 0

    k_train, k_test = digits_levels("train"), digits_levels("test")
    print(
        f"train {k_train.shape}, test {k_test.shape}, levels {int(k_train.min())}..{int(k_train.max())}"
    )
    results: dict = {"split": {"train": len(k_train), "test": len(k_test)}, "draws": args.draws}
    rng = np.random.default_rng(args.seed)
    tests = [
        dequantize(k_test, rng) for _ in range(args.draws)
    ]  # the same R test draws for every model

    # Uniform on [0, 17)^D.
    results["uniform"] = summarize(np.full((args.draws, len(k_test)), D * math.log(NUM_BINS)))
    # One Gaussian (closed-form ML on the dequantized training set).
    results["gaussian"] = summarize(np.stack([gaussian_nll(k_train, z) for z in tests]))
    print("uniform", results["uniform"]["bpd"], "gaussian", results["gaussian"]["bpd"], flush=True)

    # Gaussian mixtures: CV choice and k = 5.
    t0 = time.perf_counter()
    cv = gmm_cv(k_train, args.gmm_components, args.copies, args.seed, args.reg_covar)
    best = min(cv, key=cv.get)
    results["gmm_cv"] = {"bpd_by_k": cv, "chosen_k": best}
    z_train = np.concatenate([dequantize(k_train, rng) for _ in range(args.copies)])
    for k in sorted({5, best}):
        gmm = fit_gmm(z_train, k, args.seed, args.reg_covar)
        results[f"gmm{k}"] = summarize(np.stack([-gmm.score_samples(z) for z in tests]))
        print(f"gmm{k}", results[f"gmm{k}"]["bpd"], flush=True)
    results["gmm_seconds"] = round(time.perf_counter() - t0, 1)

    if args.diffusion:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed)
        draws: dict[str, list] = {"beta": [], "posterior": []}
        parts: dict[str, list] = {"beta": [], "posterior": []}
        for r, z in enumerate(tests):
            x = torch.from_numpy(to_model_range(z)).float().reshape(-1, 1, 8, 8)
            bound = diffusion_bound(args.diffusion, x, gen)
            for name, b in bound.items():
                draws[name].append(b.pop("nll") - JACOBIAN_NATS)
                parts[name].append(b)
            print(f"diffusion draw {r}: beta {draws['beta'][-1].mean() / (D * LN2):.4f}, "
                  f"posterior {draws['posterior'][-1].mean() / (D * LN2):.4f} bits/dim "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        for name in draws:
            results[f"diffusion_{name}"] = summarize(np.stack(draws[name]))
            results[f"diffusion_{name}"]["terms_nats"] = {
                key: float(np.mean([p[key] for p in parts[name]])) for key in parts[name][0]
            }
        results["diffusion_folder"] = args.diffusion
        results["diffusion_seconds"] = round(time.perf_counter() - t0, 1)

    print("\n| model | bits/dim | se(test) | sd(draws) |\n|---|---|---|---|")
    for key, value in results.items():
        if isinstance(value, dict) and "bpd" in value:
            print(
                f"| {key} | {value['bpd']:.4f} | {value['se_test']:.4f} | {value['sd_draws']:.4f} |"
            )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
