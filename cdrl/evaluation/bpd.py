"""Bits per dimension of held-out data (docs/method.md §9): the bound of ``cdrl.evaluation.likelihood``
in bits per dimension on dequantized images (``cdrl.data.dequantize``), held-out evaluation, the fitted
variances of the initializer's Gaussian levels, and the convergence check (the estimate at K and 4K annealing steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cdrl.data import dequantize
from cdrl.evaluation.ais import ess_fraction
from cdrl.evaluation.likelihood import (
    NLLResult,
    check_gaussian_levels,
    gaussian_level_terms,
    level_decoder_mean,
    level_energy_fn,
    negative_log_likelihood,
    top_level_base,
    top_level_log_normalizer,
)
from cdrl.guidance import null_condition
from cdrl.sampling import frozen
from cdrl.utils import randn_like

# The held-out defaults (``bits_per_dim``, ``cdrl-evaluate --metrics bpd``), sized so that the 360 digits
# test images through a 12-level model take minutes on 2 CPU cores: the cost is about
# examples x (levels - 1) x chains x annealing steps energy gradients, plus 16 x chains x steps for the top.
DEFAULT_NUM_INTERMEDIATE = 20
DEFAULT_NUM_CHAINS = 4
CONVERGENCE_TOLERANCE = 0.01  # converged: moves by < 1% when the budget is multiplied by 4


# ------------------------------------------------------------------------------- bits per dim


def _discrete(x0: Tensor, num_bins: int | None) -> bool:
    """Whether ``x0`` holds images scored as discrete pixels (dequantized) rather than continuous data."""
    return x0.dim() == 4 and num_bins is not None


def sampler_gaussian_levels(num_levels: int, refine_top: int | None, has_initializer: bool) -> int:
    """L of the chain a model samples: the levels below its ``refine_top`` noisiest ones, where the sampler
    keeps the initializer's proposal and the EBM does not refine (0 when every level is refined, or
    without an initializer); the top level stays the EBM's."""
    if not has_initializer or refine_top is None:
        return 0
    return max(0, min(num_levels - 1, num_levels - refine_top))


def model_gaussian_levels(pipeline) -> int:
    """``sampler_gaussian_levels`` of a loaded pipeline."""
    return sampler_gaussian_levels(
        pipeline.scheduler.schedule.num_levels,
        pipeline.scheduler.config.get("refine_top"),
        pipeline.initializer is not None,
    )


def fit_level_variances(
    pipeline,
    x0: Tensor,
    num_levels: int,
    *,
    num_bins: int | None = 256,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> list[float]:
    """The maximum-likelihood variances v_0 .. v_{L-1} of the Gaussian levels
    (``likelihood.gaussian_level_terms``).

    v_t = the mean over examples and dimensions of (x_t - m_t(x_{t+1}))^2, with x_{1:L} drawn from the
    forward chain q and m_t the initializer's mean (``likelihood.level_decoder_mean``; a conditional
    model's null label), on data prepared as ``bits_per_dim`` prepares it: images dequantized with
    ``num_bins``, then x_0 = data_scale * x. Fit them on training data, never on the data being scored.

    Args:
        pipeline: a ``CDRLPipeline`` with an initializer.
        x0: (n, ...) training data in [-1, 1] (before data_scale).
        num_levels: L, 1 <= L < T.
        num_bins: levels per pixel for images (ignored for vectors), as for ``bits_per_dim``.
        generator: the source of the dequantization (first, all of x0) and the forward noise (then, per
            batch and level).
        batch_size: examples per initializer forward.

    Returns:
        [v_0, ..., v_{L-1}] in the model's units squared.
    """
    initializer, scheduler = pipeline.initializer, pipeline.scheduler
    if initializer is None:
        raise ValueError("Gaussian levels need the initializer: its proposal means are their means")
    schedule, settings = scheduler.schedule, scheduler.langevin_settings()
    if not 1 <= num_levels < schedule.num_levels:
        raise ValueError(f"num_levels must be in [1, {schedule.num_levels - 1}], got {num_levels}")
    param = next(initializer.parameters())
    x = x0.to(param.device, param.dtype)
    if _discrete(x, num_bins):
        x = dequantize(x, num_bins, generator=generator)
    x = x * float(scheduler.config.data_scale)
    sizes = tuple(initializer.config.get("condition_sizes") or ())
    alphas, sigmas = schedule.alphas.double().tolist(), schedule.sigmas.double().tolist()
    totals = [0.0] * num_levels
    with torch.no_grad(), frozen(initializer):
        for i in range(0, len(x), batch_size):
            xt = x[i : i + batch_size]
            null = null_condition(sizes, len(xt), x.device) if sizes else None
            for t in range(num_levels):
                x_next = math.sqrt(alphas[t + 1]) * xt + sigmas[t + 1] * randn_like(xt, generator)
                mean = level_decoder_mean(initializer, schedule, settings, t, x_next, cond=null)
                totals[t] += float((xt - mean).double().pow(2).sum())
                xt = x_next
    return [total / x.numel() for total in totals]


def bits_per_dim(
    pipeline,
    x0: Tensor,
    *,
    num_intermediate: int = DEFAULT_NUM_INTERMEDIATE,
    num_chains: int = DEFAULT_NUM_CHAINS,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    num_bins: int | None = 256,
    base: Literal["tether", "proposal"] = "tether",
    top_num_chains: int | None = None,
    num_mcmc_steps: int = 1,
    data_generator: torch.Generator | None = None,
    progress: bool = True,
    gaussian_levels: int = 0,
    gaussian_variances: Sequence[float] | None = None,
) -> dict:
    """Negative log-likelihood and bits per dimension of data under a trained pipeline (docs/method.md §9).

    Images (x0 (n, c, h, w)) are discrete with ``num_bins`` levels per pixel (256: 8-bit): uniform
    dequantization x' = (k + u) / num_bins * 2 - 1 (``dequantize``), and the reported NLL is the discrete
    one, -log P(k) <= -log p(x') + D log(num_bins / 2); bpd = NLL / (D ln 2), which for 8-bit data in
    [-1, 1] is the continuous figure plus log2(128) = 7 bits. Vectors (x0 (n, d), the 2-D toys) are
    continuous: no dequantization, the NLL is -log p(x) in nats (it can be negative), bpd = NLL / (d ln 2).
    The density is the model's chain at x_0 = data_scale * x, through the bound of
    ``negative_log_likelihood``; each tethered level's normalizer is estimated by AIS from its tether (or the
    initializer's proposal), the top level's once for the whole set. A conditional model is evaluated
    unconditionally (its null label). The AIS estimate of each log Z is low in expectation, so with too few
    intermediate distributions the NLL comes out too low, never too high, on average. The cost is about
    n (T - 1) num_chains num_intermediate num_mcmc_steps energy gradients, plus top_num_chains times
    num_intermediate num_mcmc_steps for the top level (``DEFAULT_NUM_INTERMEDIATE`` and
    ``DEFAULT_NUM_CHAINS`` are sized for the digits test set on 2 CPU cores). With ``gaussian_levels = L``
    the lowest L levels are the initializer's exact Gaussians N(m_t(x_{t+1}), v_t I) of
    ``likelihood.gaussian_level_terms`` (no AIS there): give the v_t from ``fit_level_variances`` on
    training data. ``model_gaussian_levels`` is the L of the chain a pipeline samples.

    Args:
        pipeline: a ``CDRLPipeline`` (its ebm, scheduler and, for base="proposal", initializer).
        x0: (n, ...) data in [-1, 1] (before data_scale).
        num_intermediate: AIS annealing steps per level.
        num_chains: AIS chains per example and level.
        generator: random source (dequantization, forward noise, AIS).
        batch_size: examples per AIS batch (each runs batch_size * num_chains states at once).
        num_bins: levels per pixel for images (256: 8-bit; sklearn's 8x8 digits have 17). Ignored for
            vectors.
        base: AIS base of the tethered levels, "tether" or "proposal" (see ``negative_log_likelihood``).
        top_num_chains: AIS chains for the top level's normalizer (default 16 * num_chains).
        num_mcmc_steps: MALA transitions per intermediate distribution.
        data_generator: the source of the dequantization and the forward noise (default ``generator``,
            which then only drives AIS): equal seeds give the same data draws at any AIS settings.
        progress: a progress bar on stderr, one step per level of each batch of examples.
        gaussian_levels: L, the lowest levels scored as the initializer's Gaussians (0: every level by AIS).
        gaussian_variances: their v_0 .. v_{L-1}, in the model's units squared.

    Returns:
        A JSON-serializable dict: ``nll_nats`` (mean per example), ``bpd``, ``nll_stderr_nats``,
        ``nll_per_example`` (list), ``convention`` (dequantization and units in words),
        ``per_level_nats`` (mean term of each level t = 0..T-1, the last the marginal EBM: where the nats
        go), ``per_level_energy``, ``per_level_log_normalizer``, ``per_level_jacobian``,
        ``data_scale_nats``, ``dequantization_nats``, ``top_log_normalizer``, ``ais_acceptance`` and
        ``ais_ess_fraction`` per level, ``num_examples``, ``dims``, the AIS settings, ``gaussian_levels``
        and ``gaussian_variances``.
    """
    ebm, scheduler = pipeline.ebm, pipeline.scheduler
    initializer = pipeline.initializer if base == "proposal" or gaussian_levels else None
    if base == "proposal" and initializer is None:
        raise ValueError("base='proposal' needs a pipeline with an initializer")
    check_gaussian_levels(
        gaussian_levels, gaussian_variances, initializer, scheduler.schedule.num_levels
    )
    schedule = scheduler.schedule
    settings = scheduler.langevin_settings()
    data_scale = float(scheduler.config.data_scale)
    param = next(ebm.parameters())
    x0 = x0.to(param.device, param.dtype)
    n, dims = x0.shape[0], x0[0].numel()
    data_gen = generator if data_generator is None else data_generator
    if _discrete(x0, num_bins):
        x = dequantize(x0, num_bins, generator=data_gen)
        offset = dims * math.log(num_bins / 2)
        convention = (
            f"discrete {num_bins}-level pixels, uniform dequantization: x' = (k + u) / {num_bins} * 2 - 1, "
            f"k = round((x + 1) / 2 * {num_bins - 1}), u ~ U(0, 1); NLL = -log p(x') + D log({num_bins} / 2) "
            f"nats, an upper bound on -log P(k); bpd = NLL / (D ln 2)"
        )
    else:
        x, offset = x0, 0.0
        convention = (
            "continuous data, no dequantization: NLL = -log p(x) in nats, a density (it can be "
            "negative); bpd = NLL / (D ln 2)"
        )
    sizes = tuple(ebm.config.get("condition_sizes") or ())
    null = null_condition(sizes, n, x.device) if sizes else None
    num_top = top_num_chains or 16 * num_chains
    batches = range(0, n, batch_size)
    bar = tqdm(
        total=1 + len(batches) * (schedule.num_levels - 1),
        unit="level",
        disable=not progress,
        desc=f"bits/dim (K = {num_intermediate})",
    )

    top = top_level_log_normalizer(
        ebm,
        schedule,
        settings,
        x,
        data_scale=data_scale,
        cond=None if null is None else null[:1],
        num_intermediate=num_intermediate,
        num_chains=num_top,
        num_mcmc_steps=num_mcmc_steps,
        generator=generator,
    )
    top_log_z = float(top.log_normalizer[0])
    bar.update()
    results = []
    for i in batches:
        bar.set_postfix_str(f"examples {i + 1}-{min(i + batch_size, n)} of {n}")
        result = negative_log_likelihood(
            ebm,
            schedule,
            settings,
            x[i : i + batch_size],
            data_scale=data_scale,
            cond=None if null is None else null[i : i + batch_size],
            base=base,
            initializer=initializer,
            num_intermediate=num_intermediate,
            num_chains=num_chains,
            num_mcmc_steps=num_mcmc_steps,
            top_log_normalizer=top_log_z,
            generator=generator,
            forward_generator=data_gen,
            on_level=bar.update,
            gaussian_levels=gaussian_levels,
            gaussian_variances=gaussian_variances,
        )
        results.append(result)
    bar.close()
    nll = torch.cat([r.nll for r in results]) + offset
    acceptance = torch.cat([r.acceptance for r in results]).mean(0)
    ess = torch.cat([r.ess_fraction for r in results]).mean(0)
    acceptance[-1] = float(top.acceptance[0])
    ess[-1] = float(ess_fraction(top.log_weights)[0])
    mean = nll.mean().item()

    def level_means(field: str) -> list[float]:
        return torch.cat([getattr(r, field) for r in results]).mean(0).tolist()

    return {
        "nll_nats": mean,
        "bpd": mean / (dims * math.log(2)),
        "nll_stderr_nats": nll.std().item() / math.sqrt(n) if n > 1 else math.nan,
        "nll_per_example": nll.tolist(),
        "convention": convention,
        "per_level_nats": level_means("terms"),
        "per_level_energy": level_means("energy"),
        "per_level_log_normalizer": level_means("log_normalizer"),
        "per_level_jacobian": results[0].jacobian.tolist(),
        "data_scale_nats": results[0].data_scale_nats,
        "dequantization_nats": offset,
        "top_log_normalizer": top_log_z,
        "ais_acceptance": acceptance.tolist(),
        "ais_ess_fraction": ess.tolist(),
        "num_examples": n,
        "dims": dims,
        "num_intermediate": num_intermediate,
        "num_chains": num_chains,
        "top_num_chains": num_top,
        "num_mcmc_steps": num_mcmc_steps,
        "base": base,
        "gaussian_levels": gaussian_levels,
        "gaussian_variances": None if gaussian_variances is None else list(gaussian_variances),
    }


def heldout_bpd(
    pipeline,
    x0: Tensor,
    *,
    num_bins: int | None,
    seed: int,
    batch_size: int,
    num_intermediate: int | None = None,
    num_chains: int | None = None,
    progress: bool = True,
    gaussian_levels: int | None = None,
    gaussian_variances: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Bits per dimension of held-out data with ``bits_per_dim``, as ``cdrl-evaluate --metrics bpd`` reports it.

    Args:
        pipeline: a ``CDRLPipeline``.
        x0: (n, ...) held-out data in data units (images in [-1, 1]).
        num_bins: the data's levels per pixel for images (256 for 8-bit, 17 for the digits), with which
            they are dequantized; None for continuous data (vectors).
        seed: seeds the one generator of dequantization, forward noise and AIS.
        batch_size: examples per AIS batch.
        num_intermediate, num_chains: AIS settings; None keeps ``bits_per_dim``'s defaults.
        progress: ``bits_per_dim``'s progress bar.
        gaussian_levels, gaussian_variances: ``bits_per_dim``'s; None keeps its defaults (every level by
            AIS).

    Returns:
        ``bpd``, ``nll_nats`` (mean per example) and the rest of ``bits_per_dim``'s report (``convention``,
        ...) but the per-example values; ``num_examples``; the estimator options that were set.
    """
    given = {
        "num_intermediate": num_intermediate,
        "num_chains": num_chains,
        "num_bins": num_bins,
        "gaussian_levels": gaussian_levels,
        "gaussian_variances": gaussian_variances,
    }
    options: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    density = bits_per_dim(
        pipeline,
        x0,
        generator=torch.Generator().manual_seed(seed),
        batch_size=batch_size,
        progress=progress,
        **options,
    )
    report = {k: v for k, v in density.items() if k not in ("bpd", "nll_nats", "nll_per_example")}
    figures = {"bpd": float(density["bpd"]), "nll_nats": float(density["nll_nats"])}
    return {**figures, **report, "num_examples": len(x0), **options}


# -------------------------------------------------------------------- the convergence check


class BPDConvergence(NamedTuple):
    """Held-out bits/dim at K and factor x K annealing steps (``bpd_convergence``); each pair is (K, fK)."""

    num_intermediate: tuple[int, int]
    bpd: tuple[float, float]
    bpd_stderr: tuple[float, float]  # standard errors over examples
    nll_nats: tuple[float, float]
    nll_stderr_nats: tuple[float, float]
    relative_change: float  # |nll(fK) - nll(K)| / |nll(fK)|
    paired_stderr_nats: float  # standard error of the per-example change (same data draws)
    converged: bool
    reports: tuple[dict[str, Any], dict[str, Any]]  # bits_per_dim's, without per-example values


def convergence_criterion(
    nll: tuple[float, float],
    stderr: tuple[float, float],
    *,
    tolerance: float = CONVERGENCE_TOLERANCE,
) -> tuple[float, bool]:
    """Whether an estimate at K and at a larger budget (nll, stderr) has converged (issue 17's criterion).

    Converged: it moves by less than ``tolerance`` (1%) of the larger budget's figure, and the two agree
    within their reported standard errors, |nll_1 - nll_0| <= sqrt(stderr_0^2 + stderr_1^2). A NaN
    (one example: no standard error) is never converged. Returns (relative change, converged).
    """
    change = abs(nll[1] - nll[0])
    relative = change / abs(nll[1]) if nll[1] != 0 else math.inf
    agree = change <= math.hypot(*stderr)  # False for NaN
    return relative, bool(relative < tolerance and agree)


def bpd_convergence(
    pipeline,
    x0: Tensor,
    *,
    num_bins: int | None,
    seed: int,
    batch_size: int,
    num_intermediate: int = DEFAULT_NUM_INTERMEDIATE,
    num_chains: int = DEFAULT_NUM_CHAINS,
    factor: int = 4,
    progress: bool = True,
    gaussian_levels: int = 0,
    gaussian_variances: Sequence[float] | None = None,
) -> BPDConvergence:
    """``bits_per_dim`` at K = ``num_intermediate`` and at factor x K annealing steps, and the verdict.

    Both runs see the same examples, dequantization and forward draws x_{1:T-1} (a data generator seeded
    ``seed``) and independent AIS streams (seeds drawn from ``seed``): the per-example change is the AIS
    estimate's alone. The second run costs ``factor`` times the first. (The K figure differs, within its
    noise, from ``heldout_bpd``'s at the same seed, whose one generator also drives AIS.) Arguments as for
    ``heldout_bpd``; num_intermediate is K; the Gaussian levels (``gaussian_levels``,
    ``gaussian_variances``) are the same, exact, in both runs. Returns the figures and ``convergence_criterion``'s verdict.
    """
    if factor < 2:
        raise ValueError(f"factor must be at least 2, got {factor}")
    seeds = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    runs = [
        bits_per_dim(
            pipeline,
            x0,
            num_intermediate=steps,
            num_chains=num_chains,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(s),
            progress=progress,
            data_generator=torch.Generator().manual_seed(seed),
            gaussian_levels=gaussian_levels,
            gaussian_variances=gaussian_variances,
            **({} if num_bins is None else {"num_bins": num_bins}),
        )
        for steps, s in zip((num_intermediate, factor * num_intermediate), seeds, strict=True)
    ]
    nll, stderr = (tuple(r[key] for r in runs) for key in ("nll_nats", "nll_stderr_nats"))
    to_bits = runs[0]["dims"] * math.log(2)
    change = torch.tensor(runs[1]["nll_per_example"]) - torch.tensor(runs[0]["nll_per_example"])
    paired = change.std().item() / math.sqrt(change.numel()) if change.numel() > 1 else math.nan
    relative, converged = convergence_criterion(nll, stderr)
    return BPDConvergence(
        num_intermediate=(num_intermediate, factor * num_intermediate),
        bpd=(nll[0] / to_bits, nll[1] / to_bits),
        bpd_stderr=(stderr[0] / to_bits, stderr[1] / to_bits),
        nll_nats=nll,
        nll_stderr_nats=stderr,
        relative_change=relative,
        paired_stderr_nats=paired,
        converged=converged,
        reports=tuple({k: v for k, v in r.items() if k != "nll_per_example"} for r in runs),
    )


__all__ = [
    "CONVERGENCE_TOLERANCE",
    "DEFAULT_NUM_CHAINS",
    "DEFAULT_NUM_INTERMEDIATE",
    "BPDConvergence",
    "NLLResult",
    "bits_per_dim",
    "bpd_convergence",
    "convergence_criterion",
    "dequantize",
    "fit_level_variances",
    "gaussian_level_terms",
    "heldout_bpd",
    "level_decoder_mean",
    "model_gaussian_levels",
    "sampler_gaussian_levels",
    "level_energy_fn",
    "negative_log_likelihood",
    "top_level_base",
    "top_level_log_normalizer",
]
