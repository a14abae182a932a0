"""Langevin sampling of the recovery conditional: a plain function over a callable energy.

Sign convention: an ``EnergyFn`` returns an energy, lower is likelier, p(y) ∝ exp(-energy(y)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cdrl.utils import expand_as, randn_like

EnergyFn = Callable[[Tensor], Tensor]  # y (b, ...) -> energy (b,)


def recovery_energy(
    energy: Tensor, y: Tensor, x_next: Tensor, sigma: Tensor, tether: Tensor
) -> Tensor:
    """The recovery conditional's energy U(y) = E(y) + ||x_{t+1} - y||^2 / (2 sigma_{t+1}^2) (DRL Eq. (5)).

    Args:
        energy: (b,) the EBM's energy E(y) (already tempered, see ``langevin_refine``).
        y: (b, ...) the scaled variable sqrt(alpha_{t+1}) x_t.
        x_next: (b, ...) the conditioning sample x_{t+1}.
        sigma: (b,) sigma_{t+1}.
        tether: (b,) 1 keeps the Gaussian tether, 0 drops it (the top level is a marginal EBM).
    """
    sq = (x_next - y).flatten(1).pow(2).sum(dim=1)
    return energy + tether * sq / (2.0 * sigma**2)


@torch.no_grad()
def langevin_refine(
    energy_fn: EnergyFn,
    y: Tensor,
    x_next: Tensor,
    *,
    sigma: Tensor,
    tether: Tensor,
    step_size: Tensor,
    n_steps: int,
    noise: bool = True,
    noise_scale: float = 1.0,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """K steps of unadjusted Langevin dynamics on the recovery conditional (CDRL Eq. (6), Alg. 1).

    y <- y - (s^2 / 2) grad_y U(y) + s xi, xi ~ N(0, I), with U from ``recovery_energy``. No Metropolis
    correction, no clipping. Each step builds a fresh graph on a detached leaf and frees it, so memory does
    not grow with ``n_steps``; parameter gradients are never touched.

    Args:
        energy_fn: y (b, ...) -> (b,) energy of the EBM at this level. CDRL tempers it, E = -f / s^2
            (CDRL App. A.2); the caller builds that (see ``cdrl.sampling.level_energy``).
        y: (b, ...) initial state in y-space (the initializer's proposal, or x_{t+1} for DRL).
        x_next: (b, ...) the conditioning sample x_{t+1}.
        sigma: (b,) sigma_{t+1}.
        tether: (b,) 1 keeps the quadratic tether, 0 drops it.
        step_size: (b,) s_t.
        n_steps: K.
        noise: add the Langevin noise; False gives gradient descent on U.
        noise_scale: multiplies the noise (DRL samples with 0.99 at test time); 1 is Langevin proper.
        known: (b, ...) values in y-space that overwrite ``y`` where ``known_mask`` is 1 (inpainting).
        known_mask: (b, ...) or broadcastable, 1 = known pixel, 0 = free.
        generator: a generator, or one per sample (each sample's noise then independent of the batch).
        callback: called as callback(k, y) after step k.

    Returns:
        (b, ...) the refined, detached y.
    """
    step = expand_as(step_size, y)
    y = _constrain(y.detach(), known, known_mask)
    for k in range(n_steps):
        with torch.enable_grad():
            leaf = y.detach().requires_grad_(True)
            total = recovery_energy(energy_fn(leaf), leaf, x_next, sigma, tether)
            (grad,) = torch.autograd.grad(total.sum(), leaf)
        y = y - 0.5 * step**2 * grad
        if noise:
            y = y + noise_scale * step * randn_like(y, generator)
        y = _constrain(y, known, known_mask)
        if callback is not None:
            callback(k, y)
    return y.detach()


def _constrain(y: Tensor, known: Tensor | None, known_mask: Tensor | None) -> Tensor:
    if known is None:
        return y
    return known_mask * known + (1.0 - known_mask) * y
