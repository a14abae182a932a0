"""The variational bound on -log p(x) (docs/method.md §9): each level's tempered
energy, the top level's Gaussian base and normalizer, the per-level terms of the bound with every
recovery conditional's normalizer from ``cdrl.evaluation.ais``, or the lowest levels as the initializer's exact
Gaussian conditionals (``gaussian_level_terms``). Bits per dimension: ``cdrl.evaluation.bpd``.

Sign convention as everywhere in the package: an energy is E, p ∝ exp(-E). Log-normalizers and likelihoods
are float64, in nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from cdrl.checks import check_number
from cdrl.config import LangevinConfig
from cdrl.evaluation.ais import (
    AISResult,
    EnergyFn,
    ess_fraction,
    log_normalizer_ais,
    log_normalizer_grid,
)
from cdrl.guidance import composed
from cdrl.sampling import energy_fn as tempered_energy
from cdrl.sampling import frozen, level
from cdrl.schedule import NoiseSchedule
from cdrl.utils import randn_like


class NLLResult(NamedTuple):
    """The variational bound on -log p(x) per example, split by level (``negative_log_likelihood``).

    A Gaussian level t (``gaussian_levels``) has the columns of ``gaussian_level_terms``: its energy is the
    quadratic part, its log_normalizer (D / 2) log(v_t / sigma_{t+1}^2), its Jacobian 0, AIS figures NaN.
    """

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
            fn,
            mean,
            std,
            zero,
            base_mean=mean,
            base_std=std,
            num_intermediate=num_intermediate,
            num_chains=num_chains,
            num_mcmc_steps=num_mcmc_steps,
            generator=generator,
        )


def level_decoder_mean(
    initializer: nn.Module,
    schedule: NoiseSchedule,
    settings: LangevinConfig,
    t: int,
    x_next: Tensor,
    *,
    cond: Tensor | None = None,
) -> Tensor:
    """m_t(x_{t+1}) = mu(x_{t+1}, t) / sqrt(alpha_{t+1}): the initializer's level-t proposal mean (y-space,
    CDRL Eq. (8)) mapped back to x_t. x_next (b, ...) in the model's units; cond (b, K) labels (the null
    label for the unconditional density) or None. Returns (b, ...)."""
    lvl = level(
        schedule,
        torch.full((x_next.shape[0],), t, dtype=torch.long, device=x_next.device),
        settings,
    )
    mean = composed(initializer, x_next, lvl.next_noise_level, null=cond)
    return mean / math.sqrt(float(schedule.alphas[t + 1]))


def gaussian_level_terms(
    initializer: nn.Module,
    schedule: NoiseSchedule,
    settings: LangevinConfig,
    t: int,
    xt: Tensor,
    x_next: Tensor,
    *,
    variance: float,
    cond: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Level t's term of the bound with the initializer's Gaussian p(x_t | x_{t+1}) = N(m_t, v I) in place of
    the EBM's recovery conditional.

    The term is exact (no AIS), as DDPM's are (Ho et al. 2020, Eq. (5); at t = 0 its decoder, continuous
    here: the data are dequantized):

        term_t = -log N(x_t; m_t(x_{t+1}), v I) + log q(x_{t+1} | x_t)
               = ||x_t - m_t||^2 / (2 v) - ||x_{t+1} - sqrt(alpha_{t+1}) x_t||^2 / (2 sigma_{t+1}^2)
                 + (D / 2) log(v / sigma_{t+1}^2),

    with m_t = ``level_decoder_mean``. It is a density of x_t itself, so the level has no Jacobian term.
    ``cdrl.evaluation.bpd.fit_level_variances`` gives the maximum-likelihood v of each level.

    Args:
        initializer, schedule, settings: the model (the settings fix the initializer's inputs).
        t: the level, 0 <= t < T - 1.
        xt: (b, ...) x_t in the model's units (at t = 0: data_scale * x).
        x_next: (b, ...) its forward draw, sqrt(alpha_{t+1}) x_t + sigma_{t+1} eps.
        variance: v, in the model's units squared.
        cond: (b, K) labels (the null label for the unconditional density), or None.

    Returns:
        (quadratic (b,), log_normalizer (b,)), float64 nats: the first two terms and the last; their sum is
        term_t.
    """
    alpha, sigma = float(schedule.alphas[t + 1]), float(schedule.sigmas[t + 1])
    mean = level_decoder_mean(initializer, schedule, settings, t, x_next, cond=cond)
    decoder = (xt - mean).flatten(1).double().pow(2).sum(1) / (2 * variance)
    forward = (x_next - math.sqrt(alpha) * xt).flatten(1).double().pow(2).sum(1) / (2 * sigma**2)
    log_norm = 0.5 * xt[0].numel() * math.log(variance / sigma**2)
    return decoder - forward, torch.full_like(decoder, log_norm)


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
    gaussian_levels: int = 0,
    gaussian_variances: Sequence[float] | None = None,
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
    grid (``method="grid"``, 2-D models only). With ``gaussian_levels = L`` the lowest L steps of the chain
    are the initializer's Gaussians N(m_t(x_{t+1}), v_t I) of ``gaussian_level_terms`` instead of the EBM's
    conditionals, and their terms are exact: the bound of a chain that refines with the EBM only at the
    levels t >= L, as a sampler with ``langevin.refine_top = T - L`` does (its proposals below are this
    Gaussian's mean; v_t, fitted on training data, replaces the proposal's narrower posterior variance).
    L = 1 is DDPM's decoder; L = T - 1 leaves only the top level's marginal EBM.

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
        gaussian_levels: L, how many of the lowest levels are the initializer's exact Gaussians (needs
            ``initializer`` and ``gaussian_variances``); 0: every level is the EBM's, by AIS.
        gaussian_variances: v_0 .. v_{L-1}, in the model's units squared (see
            ``cdrl.evaluation.bpd.fit_level_variances``).

    Returns:
        An ``NLLResult``.
    """
    if method not in ("ais", "grid"):
        raise ValueError(f"unknown method {method!r}; use 'ais' or 'grid'")
    if base == "proposal" and initializer is None:
        raise ValueError("base='proposal' needs the initializer")
    check_gaussian_levels(gaussian_levels, gaussian_variances, initializer, schedule.num_levels)
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
            if t < gaussian_levels:  # exact, no AIS; no Jacobian (a density of x_t)
                energy[:, t], log_norm[:, t] = gaussian_level_terms(
                    initializer,
                    schedule,
                    settings,
                    t,
                    xs[t],
                    xs[t + 1],
                    variance=gaussian_variances[t],
                    cond=cond,
                )
                if on_level is not None:
                    on_level()
                continue
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
                    fn,
                    xs[t + 1],
                    sigma,
                    tether,
                    base_mean=base_mean,
                    base_std=base_std,
                    num_intermediate=num_intermediate,
                    num_chains=num_chains,
                    num_mcmc_steps=num_mcmc_steps,
                    generator=generator,
                )
                log_z = result.log_normalizer
                acceptance[:, t] = result.acceptance
                ess[:, t] = ess_fraction(result.log_weights)
            log_norm[:, t] = log_z - 0.5 * dims * torch.log(2.0 * math.pi * sigma**2)
            if on_level is not None:
                on_level()

    # The top level: one constant for all examples.
    if top_log_normalizer is None:
        top = top_level_log_normalizer(
            ebm,
            schedule,
            settings,
            x0,
            data_scale=data_scale,
            cond=None if cond is None else cond[:1],
            method=method,
            base=top_base,
            num_intermediate=num_intermediate,
            num_chains=top_num_chains or 16 * num_chains,
            num_mcmc_steps=num_mcmc_steps,
            grid_points=grid_points,
            generator=generator,
        )
        top_log_normalizer = float(top.log_normalizer[0])
        if method == "ais":
            acceptance[:, -1] = float(top.acceptance[0])
            ess[:, -1] = float(ess_fraction(top.log_weights)[0])
    log_norm[:, -1] = top_log_normalizer

    terms = energy + log_norm + jacobian.to(dev)
    data_scale_nats = -dims * math.log(data_scale)
    nll = terms.sum(1) + data_scale_nats
    return NLLResult(nll, terms, energy, log_norm, jacobian, data_scale_nats, acceptance, ess)


def check_gaussian_levels(
    levels: int,
    variances: Sequence[float] | None,
    initializer: nn.Module | None,
    num_levels: int,
) -> None:
    """ValueError naming the problem when ``gaussian_levels`` / ``gaussian_variances`` cannot be used."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 0 <= levels < num_levels:
        raise ValueError(
            f"gaussian_levels must be an integer in [0, {num_levels - 1}] (the top level is the EBM's), "
            f"got {levels!r}"
        )
    if levels == 0:
        if variances:
            raise ValueError("gaussian_variances are for gaussian_levels > 0")
        return
    if initializer is None:
        raise ValueError(
            "gaussian_levels needs the initializer: its proposal means are the Gaussians' means"
        )
    if variances is None or len(variances) != levels:
        got = "none" if variances is None else len(variances)
        raise ValueError(
            f"gaussian_levels={levels} needs {levels} variances, got {got} (fit them on training "
            "data with cdrl.evaluation.bpd.fit_level_variances)"
        )
    for t, v in enumerate(variances):
        if check_number(f"gaussian_variances[{t}]", v) <= 0:
            raise ValueError(f"gaussian_variances[{t}] must be > 0, got {v:g}")
