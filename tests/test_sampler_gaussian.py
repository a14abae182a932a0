"""End-to-end test of ``cdrl.sampling.sample`` where everything has a closed form: Gaussian data.

For data x_0 ~ N(m, s^2 I) every level is Gaussian, x_t ~ N(sqrt(alphabar_t) m, v_t I) with
v_t = alphabar_t s^2 + 1 - alphabar_t, and so is y = scale_t x_t (scale_t = sqrt(alpha_{t+1}), 1 at the
top level). The exact EBM of level t is then the negative log density of y, times the tempering the
sampler divides by (s_t^2, docs/method.md §3): E_t(y) = s_t^2 ||y - a_t||^2 / (2 c_t), a_t = scale_t
sqrt(alphabar_t) m, c_t = scale_t^2 v_t. Given x_{t+1} = y + sigma_{t+1} eps, the recovery conditional
is Gaussian with mean a_t + c_t / (c_t + sigma_{t+1}^2) (x_{t+1} - a_t), which the stand-in initializer
returns. With these networks, sample() must reproduce every level's marginal, and its Tweedie step
E[x_data | x_0], whose mean is m and variance alphabar_0 s^4 / v_0.

The initializer's proposal has the DDPM posterior's variance, which is smaller than the recovery
conditional's for s > 0, so Langevin has to do real work here: it must widen every proposal to the
right variance, which makes this a test of the chain (tether, tempering, step, scale) and not only of
the initializer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cdrl.config import LangevinConfig
from cdrl.sampling import sample
from cdrl.schedule import NoiseSchedule

# A three-level schedule, not CDRL's: there c_t^2 (the growth of the Langevin step with the level)
# spans 1..128, so no single step scale both mixes level 0 and is stable at the top level within a
# few hundred steps. Here every level's h / tau^2 (step^2 over the recovery conditional's variance)
# lies in 0.011..0.038, so 400 steps mix every level (see N_STEPS).
ALPHAS_CUMPROD = (0.95, 0.7, 0.35, 0.02)
MEAN = (0.6, -0.4, 0.2)  # m
DATA_VAR = 0.25  # s^2
B2 = 0.02  # the tempering s_t^2 = b^2 c_t^2 sigma_{t+1}^2 (and the Tweedie score's scale)
# The step is step_scale * s_t, so h = (step_scale s_t)^2 is a quarter of the tempering s_t^2: a
# small ULA bias, and a check that step_scale moves the step but not the target.
STEP_SCALE = 0.5
# ULA's stationary variance is tau^2 / (1 - h / (4 tau^2)): at most 1% above the target's (level 1),
# and since the conditional variance is part of the marginal one (two thirds at level 1), at most
# 0.7% of any level's variance. The proposal starts each chain with the DDPM posterior's variance,
# below the target's; that gap shrinks by (1 - h / (2 tau^2))^(2K) <= e^(-0.011 K) = 1.2% of it at
# K = 400 (level 0, the slowest). Both are far below the tolerance on a variance, 5 standard errors
# = 5 sqrt(2 / n) = 7% of it at n = 10,000.
N_STEPS = 400
N_SAMPLES = 10_000
K_SE = 5.0  # tolerance in standard errors: 9 statistics x 4 outputs, each off by > 5 SE w.p. 6e-7


def _schedule() -> NoiseSchedule:
    return NoiseSchedule(torch.tensor(ALPHAS_CUMPROD, dtype=torch.float64))


class _Exact:
    """The closed-form quantities of each level t = 0..T-1, from docs/method.md's formulas (float64)."""

    def __init__(self, schedule: NoiseSchedule, b2: float) -> None:
        ab = schedule.alphas_cumprod
        T = schedule.num_levels
        alpha = ab[1:] / ab[:-1]  # alpha_{t+1}, t = 0..T-1
        self.sigma2 = 1.0 - alpha  # sigma_{t+1}^2
        self.scale = alpha.sqrt()
        self.scale[-1] = 1.0  # the top level's EBM is a marginal one (no tether, scale 1)
        m = torch.tensor(MEAN, dtype=torch.float64)
        self.marginal_mean = ab.sqrt()[:, None] * m  # (T + 1, d): E x_t
        self.marginal_var = ab * DATA_VAR + 1.0 - ab  # (T + 1,): v_t
        self.a = self.scale[:, None] * self.marginal_mean[:T]  # (T, d)
        self.c = self.scale**2 * self.marginal_var[:T]  # (T,)
        # s_t^2 = b^2 c_t^2 sigma_{t+1}^2 with c_t^2 = sqrt(1 - alphabar_t) / sqrt(1 - alphabar_0)
        self.temperature = b2 * (1 - ab[:-1]).sqrt() / (1 - ab[0]).sqrt() * self.sigma2
        betatilde = (1 - ab[:-1]) / (1 - ab[1:]) * (1 - alpha)
        self.proposal_var = self.scale**2 * betatilde
        self.noise_levels = schedule.noise_levels.float()

    def level_of(self, noise_level: Tensor) -> int:
        """The level whose continuous noise input is ``noise_level`` (b,) (the same for the batch)."""
        index = (self.noise_levels[None] - noise_level[:, None]).abs().argmin(1)
        assert (index == index[0]).all()
        return int(index[0])


class GaussianEBM(nn.Module):
    """E_t(y) = s_t^2 ||y - a_t||^2 / (2 c_t): the exact tempered energy of y at level t."""

    def __init__(self, exact: _Exact) -> None:
        super().__init__()
        self.exact = exact

    def forward(self, y: Tensor, noise_level: Tensor, cond: Tensor | None = None) -> Tensor:
        e, t = self.exact, self.exact.level_of(noise_level)
        sq = (y - e.a[t].to(y)).pow(2).sum(1)
        return float(e.temperature[t]) * sq / (2.0 * float(e.c[t]))


class GaussianInitializer(nn.Module):
    """The exact recovery mean in y-space from x_{t+1}; at the top level, a generator from N(0, I)."""

    def __init__(self, exact: _Exact) -> None:
        super().__init__()
        self.exact = exact

    def forward(self, x_next: Tensor, noise_level: Tensor, cond: Tensor | None = None) -> Tensor:
        e = self.exact
        t = e.level_of(noise_level) - 1  # the initializer sees u'_{t+1}
        a, c = e.a[t].to(x_next), float(e.c[t])
        if t == len(e.c) - 1:
            # From x_T ~ N(0, I): a + g x_T plus the proposal noise is exactly N(a, c) when
            # g^2 + proposal_var = c.
            return a + math.sqrt(c - float(e.proposal_var[t])) * x_next
        return a + c / (c + float(e.sigma2[t])) * (x_next - a)


def _check_gaussian(x: Tensor, mean: Tensor, var: float, what: str) -> None:
    """Sample mean and covariance of x (n, d) against N(mean, var I), within K_SE standard errors.

    Standard errors for n Gaussian draws: mean sqrt(var / n); a variance var sqrt(2 / n); a
    covariance between independent coordinates var / sqrt(n).
    """
    n, d = x.shape
    x = x.double()
    sample_mean = x.mean(0)
    cov = torch.cov(x.T)
    se_mean = math.sqrt(var / n)
    assert (sample_mean - mean).abs().max() < K_SE * se_mean, (what, sample_mean, mean)
    diag_err = (cov.diagonal() - var).abs().max()
    assert diag_err < K_SE * var * math.sqrt(2 / n), (what, cov.diagonal(), var)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < K_SE * var / math.sqrt(n), (what, cov)


def test_sample_reproduces_every_marginal_of_gaussian_data():
    schedule = _schedule()
    T = schedule.num_levels
    exact = _Exact(schedule, B2)
    settings = LangevinConfig(n_steps=N_STEPS, b2=B2, step_scale=STEP_SCALE, tweedie_b2=B2)
    gen = torch.Generator().manual_seed(0)
    x_top = torch.randn(N_SAMPLES, len(MEAN), generator=gen)

    # The last Langevin state of each level, back in x-space.
    levels: dict[int, Tensor] = {}

    def keep_last(t: int, k: int, y: Tensor) -> None:
        if k == N_STEPS - 1:
            levels[t] = y / float(exact.scale[t])

    out = sample(
        GaussianEBM(exact),
        GaussianInitializer(exact),
        schedule,
        x_top,
        settings,
        generator=gen,
        callback=keep_last,
    )
    assert sorted(levels) == list(range(T))
    for t in range(T):
        _check_gaussian(
            levels[t], exact.marginal_mean[t], float(exact.marginal_var[t]), f"level {t}"
        )

    # Tweedie: E[x_data | x_0] = m + (alphabar_0 s^2 / v_0) (x_0 / sqrt(alphabar_0) - m) has mean m
    # and variance alphabar_0 s^4 / v_0 (0.207 here, against s^2 = 0.25 and v_0 / alphabar_0 = 0.303
    # for x_0 / sqrt(alphabar_0): a missing or mis-scaled step shows).
    ab0 = ALPHAS_CUMPROD[0]
    v0 = float(exact.marginal_var[0])
    _check_gaussian(out, torch.tensor(MEAN, dtype=torch.float64), ab0 * DATA_VAR**2 / v0, "tweedie")


def test_without_langevin_the_proposals_have_their_closed_form_marginals():
    """With K = 0 the chain is the initializer's proposals alone: the means stay exact, and the
    variances follow V_t = (k_t^2 V_{t+1} + p_t^2) / scale_t^2 with k_t = c_t / (c_t + sigma_{t+1}^2)
    the mean's slope and p_t^2 the proposal variance (the DDPM posterior's, smaller than the recovery
    conditional's: so these V_t are below v_t, and the test above needs Langevin to pass)."""
    schedule = _schedule()
    T = schedule.num_levels
    exact = _Exact(schedule, B2)
    settings = LangevinConfig(n_steps=0, b2=B2, tweedie=False)
    gen = torch.Generator().manual_seed(0)
    x_top = torch.randn(N_SAMPLES, len(MEAN), generator=gen)
    levels: dict[int, Tensor] = {}
    real_forward = GaussianInitializer.forward

    class Recording(GaussianInitializer):
        """Keeps each level's x_t (the proposal / scale) as the next level's input shows it."""

        def forward(self, x_next, noise_level, cond=None):
            levels[self.exact.level_of(noise_level)] = x_next
            return real_forward(self, x_next, noise_level, cond)

    levels[0] = sample(
        GaussianEBM(exact), Recording(exact), schedule, x_top, settings, generator=gen
    )
    x_var = float(
        exact.c[T - 1]
    )  # the top proposal is exactly N(a, c) (GaussianInitializer), scale 1
    for t in reversed(range(T)):
        if t < T - 1:
            k = float(exact.c[t] / (exact.c[t] + exact.sigma2[t]))
            y_var = k**2 * x_var + float(exact.proposal_var[t])  # x_var is level t + 1's here
            x_var = y_var / float(exact.scale[t]) ** 2
            assert x_var < 0.95 * float(exact.marginal_var[t])  # too narrow without Langevin
        _check_gaussian(levels[t], exact.marginal_mean[t], x_var, f"level {t}, no Langevin")
