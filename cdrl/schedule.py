"""Noise schedules over the T + 1 levels x_0 (clean) ... x_T (noise), and the quantities derived from them.

Pure tensor math; imports torch only. Level ``t`` is an integer in ``[0, T]``; every per-level quantity is a
``(T + 1,)`` float64 tensor indexed by level, and the ``gather`` helpers index it with a ``(b,)`` long tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def cosine_logsnr(u: Tensor, *, logsnr_min: float, logsnr_max: float) -> Tensor:
    """Truncated cosine log-SNR schedule, lambda(u) = -2 log tan(a u + b), u in [0, 1] (CDRL App. A.1).

    b = arctan(exp(-lambda_max / 2)), a = arctan(exp(-lambda_min / 2)) - b, so lambda(0) = lambda_max and
    lambda(1) = lambda_min.
    """
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return -2.0 * torch.log(torch.tan(a * u + b))


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process q(x_i | x_0) = N(sqrt(alphabar_i) x_0, (1 - alphabar_i) I), i = 0..T.

    Everything else (one-step alphas and sigmas, Langevin step sizes, loss weights, the initializer's
    proposal variance) is derived from ``alphas_cumprod``.
    """

    alphas_cumprod: Tensor  # (T + 1,) float64, alphabar_i, strictly decreasing

    @property
    def num_levels(self) -> int:
        """T, the number of recovery steps (EBMs)."""
        return self.alphas_cumprod.numel() - 1

    @property
    def logsnr(self) -> Tensor:
        """lambda_i = log(alphabar_i / (1 - alphabar_i)), (T + 1,)."""
        ab = self.alphas_cumprod
        return torch.log(ab) - torch.log1p(-ab)

    @property
    def alphas(self) -> Tensor:
        """One-step alpha_i = alphabar_i / alphabar_{i-1} for i >= 1; alpha_0 = alphabar_0. (T + 1,)."""
        ab = self.alphas_cumprod
        return torch.cat([ab[:1], ab[1:] / ab[:-1]])

    @property
    def sigmas(self) -> Tensor:
        """One-step sigma_i = sqrt(1 - alpha_i), the noise added going from x_{i-1} to x_i. (T + 1,)."""
        return torch.sqrt(1.0 - self.alphas)

    @property
    def noise_levels(self) -> Tensor:
        """The networks' continuous noise input u'_i = arctan(exp(-lambda_i / 2)) / (pi / 2), in (0, 1).

        Linear in i for the cosine schedule; networks never see the integer level, so T can change.
        """
        return torch.atan(torch.exp(-0.5 * self.logsnr)) / (0.5 * math.pi)

    @property
    def y_scales(self) -> Tensor:
        """sqrt(alpha_{t+1}) for t = 0..T-1, with 1 at the top level t = T-1 (a marginal EBM). (T,).

        The EBM at level t models y = sqrt(alpha_{t+1}) x_t given x_{t+1} (DRL Eq. (5)).
        """
        scales = torch.sqrt(self.alphas[1:]).clone()
        scales[-1] = 1.0
        return scales

    @property
    def has_tether(self) -> Tensor:
        """1 for levels whose recovery conditional keeps the Gaussian tether, 0 at the top level. (T,)."""
        tether = torch.ones(self.num_levels, dtype=self.alphas_cumprod.dtype)
        tether[-1] = 0.0
        return tether

    def langevin_step_sizes(self, b2: float) -> Tensor:
        """Langevin step size s_t, t = 0..T-1: s_t^2 = b^2 c_t^2 sigma_{t+1}^2 (DRL Sec. 3.4, CDRL App. A.2).

        c_t^2 = sqrt(1 - alphabar_t) / sqrt(1 - alphabar_0) grows the step with the noise level.
        """
        ab = self.alphas_cumprod
        c2 = torch.sqrt(1.0 - ab[:-1]) / torch.sqrt(1.0 - ab[0])
        return torch.sqrt(b2 * c2 * self.sigmas[1:] ** 2)

    @property
    def loss_weights(self) -> Tensor:
        """Per-level EBM loss weight w_t = sigma_1 / sigma_{t+1}, t = 0..T-1 (DRL code, CDRL Alg. 1)."""
        return self.sigmas[1] / self.sigmas[1:]

    @property
    def posterior_variances(self) -> Tensor:
        """betatilde_{t+1} = (1 - alphabar_t) / (1 - alphabar_{t+1}) (1 - alpha_{t+1}), t = 0..T-1 (DDPM Eq. (7))."""
        ab = self.alphas_cumprod
        return (1.0 - ab[:-1]) / (1.0 - ab[1:]) * (1.0 - self.alphas[1:])

    @property
    def proposal_stds(self) -> Tensor:
        """Std of the initializer's Gaussian proposal in y-space, sqrt(scale_t^2 betatilde_{t+1}). (T,)."""
        return self.y_scales * torch.sqrt(self.posterior_variances)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) noise. x0, noise: (b, ...); t: (b,) long."""
        ab = gather(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def q_pair(
        self,
        x0: Tensor,
        t: Tensor,
        *,
        variance_reduction: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw the training pair (x_t, x_{t+1}) for levels t (b,), t in [0, T - 1].

        With ``variance_reduction`` (CDRL's default) both share one eps; otherwise x_{t+1} ~ q(x_{t+1} | x_0)
        and x_t ~ q(x_t | x_{t+1}, x_0), the DDPM posterior (DDPM Eqs. (6)-(7)). Both give the same marginals.
        """
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_next = self.q_sample(x0, t + 1, eps)
        if variance_reduction:
            return self.q_sample(x0, t, eps), x_next
        ab_t, ab_next = gather(self.alphas_cumprod, t, x0), gather(self.alphas_cumprod, t + 1, x0)
        var = (1 - ab_t) / (1 - ab_next) * (1 - ab_next / ab_t)
        eps2 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.posterior_mean(x0, x_next, t) + var.sqrt() * eps2, x_next

    def posterior_mean(self, x0: Tensor, x_next: Tensor, t: Tensor) -> Tensor:
        """mu~(x_0, x_{t+1}) = E[x_t | x_{t+1}, x_0], the DDPM posterior mean (DDPM Eq. (7); docs/method.md 13).

        sqrt(alphabar_t) beta_{t+1} / (1 - alphabar_{t+1}) x_0 + sqrt(alpha_{t+1}) (1 - alphabar_t) /
        (1 - alphabar_{t+1}) x_{t+1}. Right under any coupling of (x_t, x_{t+1}), shared noise included.
        x0, x_next: (b, ...); t: (b,) long in [0, T - 1].
        """
        ab_t, ab_next = gather(self.alphas_cumprod, t, x0), gather(self.alphas_cumprod, t + 1, x0)
        alpha_next = ab_next / ab_t
        return (ab_t.sqrt() * (1 - alpha_next) * x0 + alpha_next.sqrt() * (1 - ab_t) * x_next) / (
            1 - ab_next
        )


def cdrl_schedule(
    num_levels: int = 6, *, logsnr_min: float = -5.1, logsnr_max: float = 9.8
) -> NoiseSchedule:
    """CDRL's schedule: lambda_i = cosine_logsnr(i / T), alphabar_i = sigmoid(lambda_i) (CDRL App. A.1)."""
    u = torch.arange(num_levels + 1, dtype=torch.float64) / num_levels
    logsnr = cosine_logsnr(u, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    return NoiseSchedule(torch.sigmoid(logsnr))


def drl_schedule(
    num_levels: int = 6,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_diffusion_steps: int = 1000,
) -> NoiseSchedule:
    """DRL's schedule: DDPM's linear betas sub-sampled at [0, D, 2D, ..., (T-1)D, N-1], D = N // (2(T-1)).

    Matches ``get_sigma_schedule`` in the official DRL code: level 0 is one DDPM step from the data.
    """
    if num_levels < 2:
        raise ValueError(f"the DRL schedule needs num_levels >= 2, got {num_levels}")
    betas = torch.linspace(beta_start, beta_end, num_diffusion_steps, dtype=torch.float64)
    cumprod = torch.cumprod(1.0 - betas, dim=0)
    stride = num_diffusion_steps // (2 * (num_levels - 1))
    boundaries = [i * stride for i in range(num_levels)] + [num_diffusion_steps - 1]
    return NoiseSchedule(cumprod[boundaries])


def gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] as ``like``'s dtype and device, shaped (b, 1, ..., 1) to broadcast against ``like``."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def make_schedule(
    kind: str = "cdrl",
    *,
    num_levels: int = 6,
    logsnr_min: float = -5.1,
    logsnr_max: float = 9.8,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_diffusion_steps: int = 1000,
) -> NoiseSchedule:
    """The schedule named by ``kind`` ('cdrl' or 'drl'), from the fields of ``ScheduleConfig``."""
    if kind == "cdrl":
        return cdrl_schedule(num_levels, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    if kind == "drl":
        return drl_schedule(
            num_levels,
            beta_start=beta_start,
            beta_end=beta_end,
            num_diffusion_steps=num_diffusion_steps,
        )
    raise ValueError(f"unknown schedule kind {kind!r}; use 'cdrl' or 'drl'")
