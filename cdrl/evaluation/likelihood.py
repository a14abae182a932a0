"""The variational bound on -log p(x) and bits per dimension (docs/method.md §9): each level's tempered
energy, the top level's Gaussian base and normalizer, the per-level terms of the bound with every
recovery conditional's normalizer from ``cdrl.evaluation.ais``, dequantization, and held-out bits/dim.

Sign convention as everywhere in the package: an energy is E, p ∝ exp(-E). Log-normalizers and likelihoods
are float64, in nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cdrl.config import LangevinConfig
from cdrl.evaluation.ais import (
    AISResult,
    EnergyFn,
    ess_fraction,
    log_normalizer_ais,
    log_normalizer_grid,
)
from cdrl.guidance import composed, null_condition
from cdrl.sampling import energy_fn as tempered_energy
from cdrl.sampling import frozen, level
from cdrl.schedule import NoiseSchedule
from cdrl.utils import randn_like

# The held-out defaults (``bits_per_dim``, ``cdrl-evaluate --metrics bpd``), sized so that the 360 digits
# test images through a 12-level model take minutes on 2 CPU cores: the cost is about
# examples x (levels - 1) x chains x annealing steps energy gradients, plus 16 x chains x steps for the top.
DEFAULT_NUM_INTERMEDIATE = 20
DEFAULT_NUM_CHAINS = 4
CONVERGENCE_TOLERANCE = 0.01  # converged: moves by < 1% when the budget is multiplied by 4


class NLLResult(NamedTuple):
    """The variational bound on -log p(x) per example, split by level (``negative_log_likelihood``)."""

    nll: Tensor  # (b,) float64 nats: the bound on -log p(x), data_scale Jacobian included
    terms: Tensor  # (b, T) float64 nats: each level's term, t = 0..T-1 (T-1 is the marginal EBM)
    energy: Tensor  # (b, T) float64: E(y_t, t) / temperature_t at the forward-diffused y_t
    log_normalizer: Tensor  # (b, T) float64: log Z_t minus the tether's log-normalizer; top: log Z
    jacobian: Tensor  # (T,) float64: -(D / 2) log alpha_{t+1}, 0 at the top level
    data_scale_nats: float  # -D log(data_scale), the Jacobian of x -> data_scale * x
    acceptance: Tensor  # (b, T) float64 AIS MALA acceptance (NaN for the grid)
    ess_fraction: Tensor  # (b, T) float64 final ESS of the AIS weights over M (NaN for the grid)


# ---------------------------------------------------------------------------------- the bound


def level_energy_fn(
    ebm: nn.Module,
    schedule: NoiseSchedule,
    settings: LangevinConfig,
    t: int,
    *,
    cond: Tensor | None = None,
) -> EnergyFn:
    """The tempered energy y -> E(y, t) / temperature_t of level t, for any number of rows per example.

    Args:
        ebm: the energy network, ebm(y, noise_level, cond) -> (n,).
        schedule, settings: the noise schedule and Langevin settings; they fix the temperature
            (s_t^2 when ``settings.tempered``, see ``cdrl.sampling.level``).
        t: the level.
        cond: (b, K) labels, one row per example (the rows of y come grouped per example, see
            ``EnergyFn``); None for an unconditional model.
    """
    per_size: dict[int, EnergyFn] = {}  # one per batch size, so that its cached context is reused

    def fn(y: Tensor) -> Tensor:
        n = y.shape[0]
        if n not in per_size:
            lvl = level(schedule, torch.full((n,), t, device=y.device), settings)
            labels = None if cond is None else cond.repeat_interleave(n // cond.shape[0], dim=0)
            per_size[n] = tempered_energy(ebm, lvl, null=labels)
        return per_size[n](y)

    return fn


def top_level_base(
    schedule: NoiseSchedule, x0: Tensor, *, data_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """A Gaussian AIS base for the top (marginal) EBM: the moments of q(x_{T-1}) over the data x0.

    x_{T-1} = sqrt(r) x_0 + sqrt(1 - r) eps with r = alphabar_{T-1} / alphabar_0 (the bound diffuses the
    level-0 variable x_0 = data_scale * x), so the base is N(sqrt(r) mean(x_0), (r var(x_0) + 1 - r) I),
    var averaged over dimensions.

    Returns:
        (mean (1, ...), std (1,)), float64.
    """
    ab = schedule.alphas_cumprod
    r = float(ab[-2] / ab[0])
    x = x0.double() * data_scale
    mean = math.sqrt(r) * x.mean(0, keepdim=True)
    var = r * float(x.var(0, unbiased=False).mean()) if x.shape[0] > 1 else 0.0
    return mean, torch.tensor([math.sqrt(var + 1.0 - r)], dtype=torch.float64)


def top_level_log_normalizer(
    ebm: nn.Module,
    schedule: NoiseSchedule,
    settings: LangevinConfig,
    x0: Tensor,
    *,
    data_scale: float = 1.0,
    cond: Tensor | None = None,
    method: Literal["ais", "grid"] = "ais",
    base: tuple[Tensor, Tensor] | None = None,
    num_intermediate: int = 100,
    num_chains: int = 256,
    num_mcmc_steps: int = 1,
    grid_points: int = 801,
    generator: torch.Generator | None = None,
) -> AISResult:
    """log Z_{T-1}, the log of the integral of exp(-E(y, T-1) / temperature_{T-1}) dy: the marginal EBM.

    AIS from the Gaussian ``base`` (default ``top_level_base(schedule, x0)``) with ``num_chains`` chains for
    the one constant; or, with ``method="grid"``, quadrature over the box base mean ± 8 base std.

    Args:
        ebm, schedule, settings, data_scale: as for ``negative_log_likelihood``.
        x0: (n, ...) data in data units; only its moments are used (to place the base).
        cond: (1, K) labels for a conditional EBM, or None.
        method: "ais" or "grid".
        base: (mean (1, ...), std (1,)) of the Gaussian base (AIS) or box (grid).
        num_intermediate, num_chains, num_mcmc_steps, generator: see ``log_normalizer_ais``.
        grid_points: nodes per dimension for the grid.

    Returns:
        An ``AISResult`` for one example (for the grid: NaN acceptance and step, no weights).
    """
    if method not in ("ais", "grid"):
        raise ValueError(f"unknown method {method!r}; use 'ais' or 'grid'")
    mean, std = top_level_base(schedule, x0, data_scale=data_scale) if base is None else base
    mean = mean.to(x0.device, x0.dtype).expand(1, *x0.shape[1:])
    std = torch.as_tensor(std, dtype=torch.float64, device=x0.device).reshape(1)
    zero = torch.zeros(1, dtype=torch.float64, device=x0.device)
    with frozen(ebm):
        fn = level_energy_fn(ebm, schedule, settings, schedule.num_levels - 1, cond=cond)
        if method == "grid":
            log_z = log_normalizer_grid(
                fn, mean, std, zero, half_width=8.0 * std, num_points=grid_points
            )
            nan = torch.full((1,), math.nan, dtype=torch.float64)
            empty = torch.zeros(1, 0, dtype=torch.float64)
            return AISResult(log_z, empty, nan, nan, torch.zeros(1, dtype=torch.long))
        return log_normalizer_ais(
            fn, mean, std, zero, base_mean=mean, base_std=std, num_intermediate=num_intermediate,
            num_chains=num_chains, num_mcmc_steps=num_mcmc_steps, generator=generator,
        )  # fmt: skip


def negative_log_likelihood(
    ebm: nn.Module,
    schedule: NoiseSchedule,
    settings: LangevinConfig,
    x0: Tensor,
    *,
    data_scale: float = 1.0,
    cond: Tensor | None = None,
    method: Literal["ais", "grid"] = "ais",
    base: Literal["tether", "proposal"] = "tether",
    initializer: nn.Module | None = None,
    num_intermediate: int = 100,
    num_chains: int = 16,
    num_mcmc_steps: int = 1,
    top_log_normalizer: float | None = None,
    top_num_chains: int | None = None,
    top_base: tuple[Tensor, Tensor] | None = None,
    grid_points: int = 801,
    generator: torch.Generator | None = None,
    forward_generator: torch.Generator | None = None,
    on_level: Callable[[], None] | None = None,
) -> NLLResult:
    """The variational bound on -log p(x) for continuous x (b, ...), per example and level (docs/method.md §9).

    The model is the chain p(x_{T-1}) prod_t p(x_t | x_{t+1}) over x_0 = data_scale * x: at the top the
    marginal EBM p(x_{T-1}) = exp(-E(x_{T-1}, T-1) / T_{T-1}) / Z_{T-1}, below it the recovery conditionals
    of y = sqrt(alpha_{t+1}) x_t (DRL Eq. (5); T_t is the temperature, s_t^2 when tempered):

        log p(y | x_{t+1}) = -E(y, t) / T_t - ||x_{t+1} - y||^2 / (2 sigma_{t+1}^2) - log Z_t(x_{t+1}).

    With x_{1:T-1} drawn once per example from the forward chain q(x_{t+1} | x_t) =
    N(sqrt(alpha_{t+1}) x_t, sigma_{t+1}^2 I), DDPM's bound (Ho et al. 2020, Eq. (3))

        -log p(x_0) <= E_q[-log p(x_{T-1}) - sum_t log p(x_t | x_{t+1}) + sum_t log q(x_{t+1} | x_t)]

    splits into one term per level. The tether and log q cancel exactly (both are
    ||x_{t+1} - y_t||^2 / (2 sigma^2) at the forward sample), leaving, for t < T - 1,

        term_t = E(y_t, t) / T_t + [log Z_t(x_{t+1}) - (D / 2) log(2 pi sigma_{t+1}^2)]
                 - (D / 2) log alpha_{t+1},

    the last piece the Jacobian of y = sqrt(alpha) x, and term_{T-1} = E(x_{T-1}) / T_{T-1} + log Z_{T-1}.
    Then -log p(x) = -log p(x_0) - D log(data_scale). The normalizers come from AIS (``method="ais"``),
    whose log Z is low in expectation, so the estimate can fall a little below the true bound, or from the
    grid (``method="grid"``, 2-D models only).

    Args:
        ebm: the energy network (run under ``cdrl.sampling.frozen``).
        schedule: the noise schedule.
        settings: the Langevin settings the model was trained with (they fix the temperatures).
        x0: (b, ...) continuous data in data units (before data_scale; images already dequantized).
        data_scale: the model sees data * data_scale (2-D toys: 4).
        cond: (b, K) labels for a conditional EBM; None for an unconditional one. Pass the null label for
            the unconditional density of a conditional model.
        method: "ais" or "grid".
        base: AIS base of the tethered levels: "tether", N(x_{t+1}, sigma^2 I) (docs/method.md §9), or
            "proposal", the initializer's Gaussian proposal N(mu(x_{t+1}), proposal_std^2 I), which is
            closer to a trained conditional (needs ``initializer``).
        initializer: the initializer network, for ``base="proposal"``.
        num_intermediate, num_chains, num_mcmc_steps: AIS settings of each tethered level.
        top_log_normalizer: log Z_{T-1} if known (it does not depend on x); else estimated here.
        top_num_chains: AIS chains for log Z_{T-1}; default 16 * num_chains.
        top_base: (mean, std) of the top level's AIS base or grid box (default ``top_level_base``).
        grid_points: grid nodes per dimension (the tethered boxes are x_{t+1} ± 10 sigma).
        generator: random source. The forward noise is drawn first, level by level, each shaped like x0,
            so two calls with equal seeds share x_{1:T-1}.
        forward_generator: the forward noise's own source (default ``generator``): equal seeds share
            x_{1:T-1} whatever the AIS settings.
        on_level: called after each tethered level (a progress bar's update).

    Returns:
        An ``NLLResult``.
    """
    if method not in ("ais", "grid"):
        raise ValueError(f"unknown method {method!r}; use 'ais' or 'grid'")
    if base == "proposal" and initializer is None:
        raise ValueError("base='proposal' needs the initializer")
    num_levels = schedule.num_levels
    b, dims = x0.shape[0], x0[0].numel()
    dev = x0.device
    alphas = schedule.alphas.double().tolist()
    sigmas = schedule.sigmas.double().tolist()
    scales = schedule.y_scales.double().tolist()

    # Draw x_{1:T-1} from the forward chain, all noise first (DDPM Eq. (2)).
    xs = [x0 * data_scale]
    for t in range(num_levels - 1):
        eps = randn_like(x0, generator if forward_generator is None else forward_generator)
        xs.append(math.sqrt(alphas[t + 1]) * xs[-1] + sigmas[t + 1] * eps)

    energy = torch.zeros(b, num_levels, dtype=torch.float64, device=dev)
    log_norm = torch.zeros_like(energy)
    acceptance = torch.full_like(energy, math.nan)
    ess = torch.full_like(energy, math.nan)
    jacobian = torch.zeros(num_levels, dtype=torch.float64)
    with frozen(ebm, initializer):
        for t in range(num_levels):
            fn = level_energy_fn(ebm, schedule, settings, t, cond=cond)
            energy[:, t] = fn(scales[t] * xs[t]).double()
            if t == num_levels - 1:
                break
            jacobian[t] = -0.5 * dims * math.log(alphas[t + 1])
            sigma = torch.full((b,), sigmas[t + 1], dtype=torch.float64, device=dev)
            tether = torch.ones_like(sigma)
            if method == "grid":
                log_z = log_normalizer_grid(fn, xs[t + 1], sigma, tether, num_points=grid_points)
            else:
                base_mean = base_std = None
                if base == "proposal":
                    lvl = level(schedule, torch.full((b,), t, device=dev), settings)
                    base_mean = composed(initializer, xs[t + 1], lvl.next_noise_level, null=cond)
                    base_std = lvl.proposal_std.double()
                result = log_normalizer_ais(
                    fn, xs[t + 1], sigma, tether, base_mean=base_mean, base_std=base_std,
                    num_intermediate=num_intermediate, num_chains=num_chains,
                    num_mcmc_steps=num_mcmc_steps, generator=generator,
                )  # fmt: skip
                log_z = result.log_normalizer
                acceptance[:, t] = result.acceptance
                ess[:, t] = ess_fraction(result.log_weights)
            log_norm[:, t] = log_z - 0.5 * dims * torch.log(2.0 * math.pi * sigma**2)
            if on_level is not None:
                on_level()

    # The top level: one constant for all examples.
    if top_log_normalizer is None:
        top = top_level_log_normalizer(
            ebm, schedule, settings, x0, data_scale=data_scale,
            cond=None if cond is None else cond[:1], method=method, base=top_base,
            num_intermediate=num_intermediate, num_chains=top_num_chains or 16 * num_chains,
            num_mcmc_steps=num_mcmc_steps, grid_points=grid_points, generator=generator,
        )  # fmt: skip
        top_log_normalizer = float(top.log_normalizer[0])
        if method == "ais":
            acceptance[:, -1] = float(top.acceptance[0])
            ess[:, -1] = float(ess_fraction(top.log_weights)[0])
    log_norm[:, -1] = top_log_normalizer

    terms = energy + log_norm + jacobian.to(dev)
    data_scale_nats = -dims * math.log(data_scale)
    nll = terms.sum(1) + data_scale_nats
    return NLLResult(nll, terms, energy, log_norm, jacobian, data_scale_nats, acceptance, ess)


# ------------------------------------------------------------------------------- bits per dim


def dequantize(x0: Tensor, num_bins: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of images in [-1, 1] with ``num_bins`` levels (Theis et al. 2016).

    Each pixel is quantized to k = round((x + 1) / 2 (num_bins - 1)) in {0, ..., num_bins - 1} and spread
    over its bin: x' = (k + u) / num_bins * 2 - 1, u ~ U(0, 1). Then -log P(k) <= E_u[-log p(x')] +
    D log(num_bins / 2), the bins being 2 / num_bins wide in [-1, 1].
    """
    k = torch.round((x0.clamp(-1, 1) + 1) / 2 * (num_bins - 1))
    device = generator.device if generator is not None else x0.device
    u = torch.rand(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)
    return (k + u) / num_bins * 2 - 1


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
    ``DEFAULT_NUM_CHAINS`` are sized for the digits test set on 2 CPU cores).

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

    Returns:
        A JSON-serializable dict: ``nll_nats`` (mean per example), ``bpd``, ``nll_stderr_nats``,
        ``nll_per_example`` (list), ``convention`` (dequantization and units in words),
        ``per_level_nats`` (mean term of each level t = 0..T-1, the last the marginal EBM: where the nats
        go), ``per_level_energy``, ``per_level_log_normalizer``, ``per_level_jacobian``,
        ``data_scale_nats``, ``dequantization_nats``, ``top_log_normalizer``, ``ais_acceptance`` and
        ``ais_ess_fraction`` per level, ``num_examples``, ``dims`` and the AIS settings.
    """
    ebm, scheduler = pipeline.ebm, pipeline.scheduler
    initializer = pipeline.initializer if base == "proposal" else None
    if base == "proposal" and initializer is None:
        raise ValueError("base='proposal' needs a pipeline with an initializer")
    schedule = scheduler.schedule
    settings = scheduler.langevin_settings()
    data_scale = float(scheduler.config.data_scale)
    param = next(ebm.parameters())
    x0 = x0.to(param.device, param.dtype)
    n, dims = x0.shape[0], x0[0].numel()
    data_gen = generator if data_generator is None else data_generator
    if x0.dim() == 4 and num_bins is not None:
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
        total=1 + len(batches) * (schedule.num_levels - 1), unit="level", disable=not progress,
        desc=f"bits/dim (K = {num_intermediate})",
    )  # fmt: skip

    top = top_level_log_normalizer(
        ebm, schedule, settings, x, data_scale=data_scale, cond=None if null is None else null[:1],
        num_intermediate=num_intermediate, num_chains=num_top, num_mcmc_steps=num_mcmc_steps,
        generator=generator,
    )  # fmt: skip
    top_log_z = float(top.log_normalizer[0])
    bar.update()
    results = []
    for i in batches:
        bar.set_postfix_str(f"examples {i + 1}-{min(i + batch_size, n)} of {n}")
        result = negative_log_likelihood(
            ebm, schedule, settings, x[i : i + batch_size], data_scale=data_scale,
            cond=None if null is None else null[i : i + batch_size], base=base,
            initializer=initializer, num_intermediate=num_intermediate, num_chains=num_chains,
            num_mcmc_steps=num_mcmc_steps, top_log_normalizer=top_log_z, generator=generator,
            forward_generator=data_gen, on_level=bar.update,
        )  # fmt: skip
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

    Returns:
        ``bpd``, ``nll_nats`` (mean per example) and the rest of ``bits_per_dim``'s report (``convention``,
        ...) but the per-example values; ``num_examples``; the estimator options that were set.
    """
    given = {"num_intermediate": num_intermediate, "num_chains": num_chains, "num_bins": num_bins}
    options: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    density = bits_per_dim(
        pipeline, x0, generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
        progress=progress, **options,
    )  # fmt: skip
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
    nll: tuple[float, float], stderr: tuple[float, float], *, tolerance: float = CONVERGENCE_TOLERANCE
) -> tuple[float, bool]:  # fmt: skip
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
) -> BPDConvergence:
    """``bits_per_dim`` at K = ``num_intermediate`` and at factor x K annealing steps, and the verdict.

    Both runs see the same examples, dequantization and forward draws x_{1:T-1} (a data generator seeded
    ``seed``) and independent AIS streams (seeds drawn from ``seed``): the per-example change is the AIS
    estimate's alone. The second run costs ``factor`` times the first. (The K figure differs, within its
    noise, from ``heldout_bpd``'s at the same seed, whose one generator also drives AIS.) Arguments as for
    ``heldout_bpd``; num_intermediate is K. Returns the figures and ``convergence_criterion``'s verdict.
    """
    if factor < 2:
        raise ValueError(f"factor must be at least 2, got {factor}")
    seeds = torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
    runs = [
        bits_per_dim(
            pipeline, x0, num_intermediate=steps, num_chains=num_chains, batch_size=batch_size,
            generator=torch.Generator().manual_seed(s), progress=progress,
            data_generator=torch.Generator().manual_seed(seed),
            **({} if num_bins is None else {"num_bins": num_bins}),
        )
        for steps, s in zip((num_intermediate, factor * num_intermediate), seeds, strict=True)
    ]  # fmt: skip
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
    "heldout_bpd",
    "level_energy_fn",
    "negative_log_likelihood",
    "top_level_base",
    "top_level_log_normalizer",
]
