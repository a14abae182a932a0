"""Log-normalizers of unnormalized densities (docs/method.md §9): annealed importance sampling with MALA
transitions, resampling and step adaptation, its effective sample size, and, for 2-D models, the exact
grid quadrature it is tested against.

Sign convention as everywhere in the package: an energy is E, p ∝ exp(-E). Log-normalizers are float64,
in nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from cdrl.utils import expand_as, randn_like

# The energy functions here see several states per example: rows [i n, (i + 1) n) of the input belong to
# example i (``repeat_interleave`` order); n is the number of chains (AIS) or a chunk of grid nodes (grid).
EnergyFn = Callable[[Tensor], Tensor]  # y (b * n, ...) -> energy (b * n,)

# Initial MALA step: MALA_SCALE * std * D^(-1/6), the optimal scaling for a Gaussian of that std
# (Roberts & Rosenthal 1998: l ~ 1.65, acceptance ~ 0.574).
MALA_SCALE = 1.65


class AISResult(NamedTuple):
    """One annealed importance sampling run over b examples with M chains each."""

    log_normalizer: Tensor  # (b,) float64 log Z-hat
    log_weights: Tensor  # (b, M) float64 final log-weights (since the last resampling)
    acceptance: Tensor  # (b,) float64 mean MALA acceptance rate
    step_size: Tensor  # (b,) float64 the adapted MALA step at the end of the path
    num_resamples: Tensor  # (b,) long, how often the example's chains were resampled


# ---------------------------------------------------------------------------------------- AIS


def annealing_schedule(
    num_intermediate: int,
    kind: Literal["linear", "sigmoid"] = "linear",
    *,
    sharpness: float = 4.0,
) -> Tensor:
    """Inverse temperatures 0 = beta_0 < beta_1 < ... < beta_K = 1, (K + 1,) float64.

    "linear" spaces them evenly; "sigmoid" by sigmoid(sharpness (2 k / K - 1)) rescaled to [0, 1], with
    small steps near both ends (Grosse et al. 2015). On the 2-D and digits models tried, linear did as
    well or better (experiments/results/long_run.md).
    """
    if num_intermediate < 1:
        raise ValueError(f"num_intermediate must be >= 1, got {num_intermediate}")
    u = torch.linspace(0.0, 1.0, num_intermediate + 1, dtype=torch.float64)
    if kind == "linear":
        return u
    if kind == "sigmoid":
        s = torch.sigmoid(sharpness * (2.0 * u - 1.0))
        betas = (s - s[0]) / (s[-1] - s[0])
        betas[0], betas[-1] = 0.0, 1.0
        return betas
    raise ValueError(f"unknown annealing schedule {kind!r}; use 'linear' or 'sigmoid'")


class _Path(NamedTuple):
    """The geometric path log gamma_beta = (1 - beta) log N(y; mean, std^2) + beta log gamma(y), per row."""

    x_next: Tensor  # (n, ...) tether centre
    sigma: Tensor  # (n,) float64
    tether: Tensor  # (n,) float64
    mean: Tensor  # (n, ...) base mean
    std: Tensor  # (n,) float64 base std

    def log_target_minus_base(self, y: Tensor, e: Tensor) -> Tensor:
        """log gamma(y) - log gamma_0(y), with gamma_0 the unnormalized base exp(-||y - mean||^2 / 2 std^2)."""
        return self.log_density(y, e, 1.0) - self.log_density(y, e, 0.0)

    def log_density(self, y: Tensor, e: Tensor, beta: float) -> Tensor:
        """log gamma_beta(y) (unnormalized), (n,) float64; e = E(y), (n,) float64."""
        tether_sq = (self.x_next - y).flatten(1).double().pow(2).sum(1)
        base_sq = (y - self.mean).flatten(1).double().pow(2).sum(1)
        target = -e - self.tether * tether_sq / (2.0 * self.sigma**2)
        return (1.0 - beta) * (-base_sq / (2.0 * self.std**2)) + beta * target

    def grad(self, y: Tensor, grad_e: Tensor, beta: float) -> Tensor:
        """grad_y log gamma_beta(y), shaped like y."""
        grad_target = -grad_e - expand_as(self.tether / self.sigma**2, y) * (y - self.x_next)
        grad_base = -expand_as(1.0 / self.std**2, y) * (y - self.mean)
        return (1.0 - beta) * grad_base + beta * grad_target


def _energy_and_grad(energy_fn: EnergyFn, y: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        leaf = y.detach().requires_grad_(True)
        energy = energy_fn(leaf)
        (grad,) = torch.autograd.grad(energy.sum(), leaf)
    return energy.detach().double(), grad.detach()


@torch.no_grad()
def log_normalizer_ais(
    energy_fn: EnergyFn,
    x_next: Tensor,
    sigma: Tensor,
    tether: Tensor,
    *,
    base_mean: Tensor | None = None,
    base_std: Tensor | None = None,
    num_intermediate: int = 100,
    num_chains: int = 16,
    num_mcmc_steps: int = 1,
    schedule: Literal["linear", "sigmoid"] | Tensor = "linear",
    resample_threshold: float = 0.5,
    target_acceptance: float = 0.6,
    adaptation_rate: float = 0.5,
    generator: torch.Generator | None = None,
) -> AISResult:
    """log Z = log of the integral of gamma(y) = exp(-E(y) - tether ||x_{t+1} - y||^2 / (2 sigma^2)) dy.

    Annealed importance sampling (Neal 2001) from a Gaussian base N(base_mean, base_std^2 I) along the
    geometric path log gamma_beta = (1 - beta) log N + beta log gamma, with ``num_mcmc_steps``
    Metropolis-adjusted Langevin (MALA) transitions at each intermediate beta. The default base is the
    tether N(x_{t+1}, sigma^2 I) itself, and then the path only anneals the energy term:
    log gamma_beta = -beta E - ||x_{t+1} - y||^2 / (2 sigma^2) + const. For a marginal EBM (tether 0), pass
    a base that covers it (``top_level_base``).

    Each transition leaves its intermediate distribution invariant, so Z-hat is unbiased and log Z-hat
    converges to log Z as ``num_intermediate`` grows; for finite settings log Z-hat is low in expectation
    (Jensen). When the effective sample size of an example's weights falls below ``resample_threshold``
    times M, its chains are resampled in proportion to their weights and its mean weight is banked (an SMC
    sampler, Del Moral et al. 2006: still unbiased for Z; 0 turns it off). The MALA step is adapted per
    example from its chains' acceptance rate, as adaptive SMC does (Fearnhead & Taylor 2013).

    Args:
        energy_fn: y (b * M, ...) -> (b * M,) energy, already divided by the level's temperature; rows
            [i M, (i + 1) M) belong to example i.
        x_next: (b, ...) x_{t+1}, the tether's centre (unused where tether is 0).
        sigma: (b,) sigma_{t+1}.
        tether: (b,) 1 keeps the tether, 0 drops it.
        base_mean: (b, ...) or broadcastable mean of the Gaussian base; default ``x_next``.
        base_std: (b,) or (1,) std of the base; default ``sigma``.
        num_intermediate: K, the number of annealing steps beta_0 = 0 < ... < beta_K = 1; the chains visit
            the K - 1 intermediate distributions in between (K = 1: plain importance sampling).
        num_chains: M, chains per example.
        num_mcmc_steps: MALA transitions per intermediate distribution. A run costs about
            1 + (K - 1) num_mcmc_steps energy gradients per chain.
        schedule: the spacing of beta (``annealing_schedule``), or the (K + 1,) betas themselves.
        resample_threshold: resample an example's chains when their ESS / M falls below this.
        target_acceptance: the MALA acceptance rate the step adaptation aims at.
        adaptation_rate: change of log(step) per unit of acceptance error, per transition.
        generator: random source.

    Returns:
        An ``AISResult``; its ``log_normalizer`` (b,) is log Z-hat in nats.
    """
    b, num = x_next.shape[0], num_chains
    dims = x_next[0].numel()
    dev = x_next.device
    if isinstance(schedule, Tensor):
        betas = schedule.double().tolist()
    else:
        betas = annealing_schedule(num_intermediate, schedule).tolist()
    if len(betas) != num_intermediate + 1 or betas[0] != 0.0 or betas[-1] != 1.0:
        raise ValueError("the annealing schedule must go from 0 to 1 in K + 1 values")
    sigma, tether = sigma.double().to(dev), tether.double().to(dev)
    mean = x_next if base_mean is None else base_mean.to(x_next).expand_as(x_next)
    std = sigma if base_std is None else base_std.double().to(dev).expand(b)

    def rep(v: Tensor) -> Tensor:
        return v.repeat_interleave(num, dim=0)

    path = _Path(rep(x_next), rep(sigma), rep(tether), rep(mean), rep(std))

    # Draw the chains from the base, then alternate weight updates and transitions (Neal 2001, Sec. 2).
    y = path.mean + expand_as(path.std, path.mean) * randn_like(path.mean, generator)
    e, grad_e = _energy_and_grad(energy_fn, y)
    log_w = torch.zeros(b * num, dtype=torch.float64, device=dev)
    log_banked = torch.zeros(b, dtype=torch.float64, device=dev)
    resamples = torch.zeros(b, dtype=torch.long, device=dev)
    log_step = torch.log(MALA_SCALE * std * dims ** (-1.0 / 6.0))
    accepted = torch.zeros(b, dtype=torch.float64, device=dev)
    for k in range(1, num_intermediate + 1):
        log_w += (betas[k] - betas[k - 1]) * path.log_target_minus_base(y, e)
        if k == num_intermediate:
            break  # the weights are complete; a transition at beta = 1 would not change them
        if resample_threshold > 0:
            rows, low, log_mean = _resample(log_w.reshape(b, num), resample_threshold, generator)
            if bool(low.any()):
                y, e, grad_e = y[rows], e[rows], grad_e[rows]
                log_w = torch.where(rep(low), torch.zeros_like(log_w), log_w)
                log_banked += torch.where(low, log_mean, torch.zeros_like(log_mean))
                resamples += low.long()
        for _ in range(num_mcmc_steps):
            y, e, grad_e, accept = _mala_step(
                energy_fn, path, y, e, grad_e, betas[k], rep(log_step.exp()), generator
            )
            rate = accept.double().reshape(b, num).mean(1)
            accepted += rate
            log_step = log_step + adaptation_rate * (rate - target_acceptance)

    log_w = log_w.reshape(b, num)
    log_base = 0.5 * dims * torch.log(2.0 * math.pi * std**2)
    log_z = log_base + log_banked + torch.logsumexp(log_w, dim=1) - math.log(num)
    transitions = (num_intermediate - 1) * num_mcmc_steps
    acceptance = accepted / transitions if transitions else torch.full_like(accepted, math.nan)
    return AISResult(log_z, log_w, acceptance, log_step.exp(), resamples)


def _resample(
    log_w: Tensor, threshold: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Multinomial resampling of the examples whose ESS / M is below ``threshold``.

    Returns the rows to keep (b * M,) (identity for the other examples), the mask of resampled examples
    (b,), and each example's log mean weight (b,).
    """
    b, num = log_w.shape
    low = ess_fraction(log_w) < threshold
    log_mean = torch.logsumexp(log_w, dim=1) - math.log(num)
    picks = torch.arange(num, device=log_w.device).expand(b, num)
    if bool(low.any()):
        device = generator.device if generator is not None else log_w.device
        probs = torch.softmax(log_w, dim=1).to(device)
        drawn = torch.multinomial(probs, num, replacement=True, generator=generator)
        picks = torch.where(low[:, None], drawn.to(log_w.device), picks)
    rows = (picks + num * torch.arange(b, device=log_w.device)[:, None]).reshape(-1)
    return rows, low, log_mean


def _mala_step(
    energy_fn: EnergyFn,
    path: _Path,
    y: Tensor,
    e: Tensor,
    grad_e: Tensor,
    beta: float,
    step: Tensor,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Metropolis-adjusted Langevin transition leaving gamma_beta invariant (Roberts & Tweedie 1996).

    y' = y + (h^2 / 2) grad log gamma_beta(y) + h xi, accepted with probability
    min(1, gamma_beta(y') q(y | y') / (gamma_beta(y) q(y' | y))).
    """
    h = expand_as(step, y)
    grad = path.grad(y, grad_e, beta)
    proposal = y + 0.5 * h**2 * grad + h * randn_like(y, generator)
    e_new, grad_e_new = _energy_and_grad(energy_fn, proposal)
    grad_new = path.grad(proposal, grad_e_new, beta)

    def log_q(to: Tensor, frm: Tensor, grad_frm: Tensor) -> Tensor:
        """log N(to; frm + h^2 / 2 grad_frm, h^2 I), up to a constant that cancels."""
        diff = (to - frm - 0.5 * h**2 * grad_frm).flatten(1).double()
        return -diff.pow(2).sum(1) / (2.0 * step**2)

    log_ratio = (
        path.log_density(proposal, e_new, beta)
        - path.log_density(y, e, beta)
        + log_q(y, proposal, grad_new)
        - log_q(proposal, y, grad)
    )
    device = generator.device if generator is not None else log_ratio.device
    u = torch.rand(log_ratio.shape, generator=generator, dtype=torch.float64, device=device)
    accept = torch.log(u.to(log_ratio.device)) < torch.nan_to_num(log_ratio, nan=-math.inf)
    keep = accept.reshape(-1, *([1] * (y.dim() - 1)))
    return (
        torch.where(keep, proposal, y),
        torch.where(accept, e_new, e),
        torch.where(keep, grad_e_new, grad_e),
        accept,
    )


def ess_fraction(log_weights: Tensor) -> Tensor:
    """Effective sample size over M, (sum w)^2 / (M sum w^2), of importance weights (b, M) -> (b,)."""
    num = log_weights.shape[1]
    log_ess = 2 * torch.logsumexp(log_weights, 1) - torch.logsumexp(2 * log_weights, 1)
    return torch.exp(log_ess) / num


# --------------------------------------------------------------------------------------- grid


@torch.no_grad()
def log_normalizer_grid(
    energy_fn: EnergyFn,
    x_next: Tensor,
    sigma: Tensor,
    tether: Tensor,
    *,
    center: Tensor | None = None,
    half_width: Tensor | float | None = None,
    num_points: int = 801,
    max_rows: int = 1 << 16,
) -> Tensor:
    """The same log Z as ``log_normalizer_ais``, by quadrature: exact up to the grid, for small D.

    A Riemann sum of gamma(y) over num_points^D nodes of the box center ± half_width (the trapezoid rule
    when gamma vanishes at the edges; O(h^2) for a ReLU network's piecewise-linear energy). Meant for the
    2-D models, where it is the test of the AIS estimator (docs/method.md §9).

    Args:
        energy_fn: as for ``log_normalizer_ais``; called on chunks of nodes, rows [i n, (i + 1) n) for
            example i.
        x_next, sigma, tether: (b, D), (b,), (b,) as for ``log_normalizer_ais``.
        center: (b, D) or broadcastable centre of the box; default ``x_next``.
        half_width: (b,) or a float; default 10 sigma (the tether's mass beyond is below e^-50). For a
            marginal EBM (tether 0), pass a box that holds all of its mass.
        num_points: nodes per dimension.
        max_rows: the most nodes passed to ``energy_fn`` at once.

    Returns:
        (b,) float64 log Z.
    """
    if x_next.dim() != 2:
        raise ValueError(f"the grid takes vectors (b, D); got shape {tuple(x_next.shape)}")
    b, dims = x_next.shape
    if num_points**dims > 1 << 26:
        raise ValueError(f"{num_points}^{dims} nodes is too many; the grid is for D <= 3")
    dev = x_next.device
    sigma, tether = sigma.double().to(dev), tether.double().to(dev)
    center = (x_next if center is None else center.to(x_next).expand_as(x_next)).double()
    if half_width is None:
        half = 10.0 * sigma
    else:
        half = torch.as_tensor(half_width, dtype=torch.float64, device=dev).expand(b)
    unit = torch.linspace(-1.0, 1.0, num_points, dtype=torch.float64, device=dev)
    nodes = torch.cartesian_prod(*([unit] * dims)).reshape(-1, dims)  # (N^D, D) in [-1, 1]^D
    chunk = max(1, max_rows // b)
    parts = []
    for start in range(0, nodes.shape[0], chunk):
        part = nodes[None, start : start + chunk]
        y = center[:, None, :] + half[:, None, None] * part  # (b, n, D)
        e = energy_fn(y.reshape(-1, dims).to(x_next.dtype)).double().reshape(b, -1)
        sq = (y - x_next.double()[:, None, :]).pow(2).sum(-1)
        log_gamma = -e - tether[:, None] * sq / (2.0 * sigma[:, None] ** 2)
        parts.append(torch.logsumexp(log_gamma, dim=1))
    spacing = 2.0 * half / (num_points - 1)
    return torch.logsumexp(torch.stack(parts, dim=1), dim=1) + dims * torch.log(spacing)


__all__ = [
    "AISResult",
    "EnergyFn",
    "annealing_schedule",
    "ess_fraction",
    "log_normalizer_ais",
    "log_normalizer_grid",
]
