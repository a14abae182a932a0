"""Tests of cdrl.schedule against docs/method.md §2 (CDRL) and DRL's sub-sampled linear betas."""

from __future__ import annotations

import math

import pytest
import torch

from cdrl.schedule import (
    NoiseSchedule,
    cdrl_schedule,
    cosine_logsnr,
    drl_schedule,
    gather,
    make_schedule,
)

# docs/method.md §2: i, lambda_i, alphabar_i, one-step sigma_i
TABLE = [
    (0, 9.800, 0.999945, None),
    (1, 2.689, 0.93636, 0.2522),
    (2, 1.197, 0.76797, 0.4241),
    (3, 0.141, 0.53521, 0.5505),
    (4, -0.876, 0.29399, 0.6713),
    (5, -2.172, 0.10226, 0.8076),
    (6, -5.100, 0.00606, 0.9699),
]


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return cdrl_schedule(6)


def test_table(schedule):
    assert schedule.num_levels == 6
    assert schedule.alphas_cumprod.dtype == torch.float64
    for i, lam, ab, sigma in TABLE:
        assert schedule.logsnr[i].item() == pytest.approx(lam, abs=1e-3)
        assert schedule.alphas_cumprod[i].item() == pytest.approx(ab, abs=1e-5)
        if sigma is not None:
            assert schedule.sigmas[i].item() == pytest.approx(sigma, abs=1e-4)


def test_cosine_constants_and_endpoints():
    # the same arithmetic as cosine_logsnr's a and b
    b = math.atan(math.exp(-0.5 * 9.8))
    a = math.atan(math.exp(-0.5 * -5.1)) - b
    assert a == pytest.approx(1.485426, abs=1e-6)
    assert b == pytest.approx(0.007446, abs=1e-6)
    u = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    lam = cosine_logsnr(u, logsnr_min=-5.1, logsnr_max=9.8)
    expected = -2 * torch.log(torch.tan(a * u + b))
    torch.testing.assert_close(lam, expected, rtol=0, atol=1e-12)
    assert lam[0].item() == pytest.approx(9.8, abs=1e-9)
    assert lam[-1].item() == pytest.approx(-5.1, abs=1e-9)


def test_one_step_alphas_compose_to_cumprod(schedule):
    torch.testing.assert_close(
        torch.cumprod(schedule.alphas, 0), schedule.alphas_cumprod, rtol=1e-12, atol=0
    )
    torch.testing.assert_close(schedule.sigmas, torch.sqrt(1 - schedule.alphas))


def test_langevin_step_sizes(schedule):
    # docs/method.md §3 gives s_t to four decimals; the formula meets them to the rounding, 5e-5
    expected = torch.tensor([0.0050, 0.0494, 0.0886, 0.1285, 0.1716, 0.2188], dtype=torch.float64)
    steps = schedule.langevin_step_sizes(4e-4)
    assert steps.shape == (6,)
    torch.testing.assert_close(steps, expected, rtol=0, atol=5e-5)
    # s_t^2 = b^2 c_t^2 sigma_{t+1}^2, so s scales with b
    torch.testing.assert_close(schedule.langevin_step_sizes(1e-4), steps / 2)


def test_loss_weights(schedule):
    expected = torch.tensor([1, 0.595, 0.458, 0.376, 0.312, 0.260], dtype=torch.float64)
    torch.testing.assert_close(schedule.loss_weights, expected, rtol=0, atol=5e-4)
    assert schedule.loss_weights[0].item() == 1.0


def test_drl_sigmas():
    schedule = drl_schedule(6)
    expected = torch.tensor([0.324, 0.517, 0.632, 0.713, 0.773, 0.9997], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigmas[1:], expected, rtol=0, atol=1e-3)
    assert schedule.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)  # one DDPM step
    with pytest.raises(ValueError, match="num_levels"):
        drl_schedule(1)


@pytest.mark.parametrize("num_levels", [1, 4, 6, 10])
def test_cdrl_monotone_and_linear_noise_levels(num_levels):
    schedule = cdrl_schedule(num_levels)
    assert schedule.num_levels == num_levels
    ab = schedule.alphas_cumprod
    assert ab.shape == (num_levels + 1,)
    assert (ab[1:] < ab[:-1]).all() and (ab > 0).all() and (ab < 1).all()
    assert (schedule.logsnr[1:] < schedule.logsnr[:-1]).all()
    # u'_i = (a i / T + b) / (pi / 2): linear in i, strictly inside (0, 1)
    u = schedule.noise_levels
    steps = u[1:] - u[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, steps[0].item()), rtol=0, atol=1e-9)
    b = math.atan(math.exp(-0.5 * 9.8))
    a = math.atan(math.exp(0.5 * 5.1)) - b
    torch.testing.assert_close(
        u,
        (a * torch.arange(num_levels + 1, dtype=torch.float64) / num_levels + b) / (math.pi / 2),
        rtol=0,
        atol=1e-9,
    )
    assert 0 < u[0] < u[-1] < 1


@pytest.mark.parametrize("kind", ["cdrl", "drl"])
def test_per_level_quantities(kind):
    schedule = make_schedule(kind, num_levels=6)
    ab, alphas = schedule.alphas_cumprod, schedule.alphas
    scales, tether = schedule.y_scales, schedule.has_tether
    assert scales.shape == tether.shape == (6,)
    torch.testing.assert_close(scales[:-1], alphas[1:-1].sqrt())
    assert scales[-1].item() == 1.0
    assert tether.tolist() == [1.0] * 5 + [0.0]
    # betatilde_{t+1} = (1 - ab_t) / (1 - ab_{t+1}) (1 - alpha_{t+1}), proposal std = scale sqrt(betatilde)
    betatilde = (1 - ab[:-1]) / (1 - ab[1:]) * (1 - alphas[1:])
    torch.testing.assert_close(schedule.posterior_variances, betatilde)
    torch.testing.assert_close(schedule.proposal_stds, scales * betatilde.sqrt())
    assert (schedule.proposal_stds > 0).all()
    # the posterior variance is below the one-step variance
    assert (schedule.posterior_variances < 1 - alphas[1:]).all()


def test_q_sample_and_gather(schedule):
    x0 = torch.randn(3, 1, 2, 2)
    noise = torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 3, 6])
    ab = schedule.alphas_cumprod[t].float().reshape(3, 1, 1, 1)
    torch.testing.assert_close(
        schedule.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    )
    g = gather(schedule.alphas_cumprod, t, x0)
    assert g.shape == (3, 1, 1, 1) and g.dtype == torch.float32


N_DRAWS = 20_000


def _pair_moments(schedule, t_level, variance_reduction, seed=0):
    x0 = torch.tensor([0.7, -0.4], dtype=torch.float64).repeat(N_DRAWS, 1)
    t = torch.full((N_DRAWS,), t_level)
    gen = torch.Generator().manual_seed(seed)
    x_t, x_next = schedule.q_pair(x0, t, variance_reduction=variance_reduction, generator=gen)
    return x0, x_t, x_next


@pytest.mark.parametrize("variance_reduction", [True, False])
@pytest.mark.parametrize("t_level", [0, 2, 5])
def test_q_pair_marginals(schedule, variance_reduction, t_level):
    x0, x_t, x_next = _pair_moments(schedule, t_level, variance_reduction)
    ab = schedule.alphas_cumprod
    for x, level in ((x_t, t_level), (x_next, t_level + 1)):
        mean = ab[level].sqrt() * x0[0]
        var = 1 - ab[level]
        sd = var.sqrt()
        # 5 standard errors for the mean, 5 % for the variance (SE about 1 % at 20k draws)
        assert ((x.mean(0) - mean).abs() < 5 * sd / math.sqrt(N_DRAWS)).all()
        torch.testing.assert_close(x.var(0), var.expand(2), rtol=0.05, atol=0)


def test_q_pair_variance_reduction_shares_eps(schedule):
    x0, x_t, x_next = _pair_moments(schedule, 2, True)
    ab = schedule.alphas_cumprod
    eps_t = (x_t - ab[2].sqrt() * x0) / (1 - ab[2]).sqrt()
    eps_next = (x_next - ab[3].sqrt() * x0) / (1 - ab[3]).sqrt()
    torch.testing.assert_close(eps_t, eps_next, rtol=0, atol=1e-10)


def test_q_pair_without_variance_reduction_is_the_forward_joint(schedule):
    # x_{t+1} = sqrt(alpha_{t+1}) x_t + sigma_{t+1} eps', so Cov(x_t, x_{t+1}) = sqrt(alpha_{t+1}) (1 - ab_t)
    t_level = 2
    x0, x_t, x_next = _pair_moments(schedule, t_level, False)
    ab, alphas = schedule.alphas_cumprod, schedule.alphas
    cov = ((x_t - x_t.mean(0)) * (x_next - x_next.mean(0))).mean(0)
    expected = alphas[t_level + 1].sqrt() * (1 - ab[t_level])
    torch.testing.assert_close(cov, expected.expand(2), rtol=0.05, atol=0)
    # the one-step residual is independent of x_t with variance 1 - alpha_{t+1}
    resid = x_next - alphas[t_level + 1].sqrt() * x_t
    torch.testing.assert_close(resid.var(0), (1 - alphas[t_level + 1]).expand(2), rtol=0.05, atol=0)
    corr = ((resid - resid.mean(0)) * (x_t - x_t.mean(0))).mean(0) / (resid.std(0) * x_t.std(0))
    assert (corr.abs() < 0.04).all()


def test_q_pair_reproducible_with_generator(schedule):
    x0 = torch.randn(5, 3)
    t = torch.tensor([0, 1, 2, 3, 5])
    for vr in (True, False):
        a = schedule.q_pair(
            x0, t, variance_reduction=vr, generator=torch.Generator().manual_seed(7)
        )
        b = schedule.q_pair(
            x0, t, variance_reduction=vr, generator=torch.Generator().manual_seed(7)
        )
        # bit-exact: the same seed, shapes and process
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        assert a[0].dtype == x0.dtype and a[0].shape == x0.shape


def test_make_schedule_dispatch():
    torch.testing.assert_close(
        make_schedule("cdrl", num_levels=4).alphas_cumprod, cdrl_schedule(4).alphas_cumprod
    )
    torch.testing.assert_close(
        make_schedule("drl", num_levels=4).alphas_cumprod, drl_schedule(4).alphas_cumprod
    )
    custom = make_schedule("cdrl", num_levels=3, logsnr_min=-3.0, logsnr_max=5.0)
    assert custom.logsnr[0].item() == pytest.approx(5.0)
    assert custom.logsnr[-1].item() == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="'ddpm'"):
        make_schedule("ddpm")


def _regress(x_t, x_next):
    """Least-squares slope and intercept of x_t on x_{t+1}, per coordinate."""
    dx = x_next - x_next.mean(0)
    slope = (dx * (x_t - x_t.mean(0))).mean(0) / dx.pow(2).mean(0)
    return slope, x_t.mean(0) - slope * x_next.mean(0)


@pytest.mark.parametrize("t_level", [0, 2, 4])
def test_posterior_mean_is_the_mean_of_x_t_given_x_next_and_x0(schedule, t_level):
    # For fixed x_0, E[x_t | x_{t+1}] is linear in x_{t+1}: regress the forward joint's x_t on x_{t+1}.
    x0, x_t, x_next = _pair_moments(schedule, t_level, False)
    slope, intercept = _regress(x_t, x_next)
    t = torch.full((2,), t_level)
    zero = torch.zeros(1, 2, dtype=torch.float64)
    exact_intercept = schedule.posterior_mean(x0[:1], zero, t[:1])[0]
    exact_slope = schedule.posterior_mean(torch.zeros_like(zero), zero + 1, t[:1])[0]
    ab, alphas = schedule.alphas_cumprod, schedule.alphas
    # The closed form (DDPM Eq. (7)), written out independently of the code's arrangement.
    coef_x0 = ab[t_level].sqrt() * (1 - alphas[t_level + 1]) / (1 - ab[t_level + 1])
    coef_next = alphas[t_level + 1].sqrt() * (1 - ab[t_level]) / (1 - ab[t_level + 1])
    torch.testing.assert_close(exact_slope, coef_next.expand(2), rtol=1e-12, atol=0)
    torch.testing.assert_close(exact_intercept, coef_x0 * x0[0], rtol=1e-12, atol=1e-15)
    # slope SE ~ sqrt(betatilde / Var(x_next) / N) < 0.01 at 20k draws
    torch.testing.assert_close(slope, exact_slope, rtol=0, atol=0.03)
    torch.testing.assert_close(intercept, exact_intercept, rtol=0, atol=0.03)


@pytest.mark.parametrize("t_level", [1, 2, 3])
def test_shared_noise_pairs_regress_onto_the_ddim_mean_not_the_posterior_mean(schedule, t_level):
    # Why train.init_data_target exists (docs/method.md §13): under shared noise x_t is a deterministic
    # function of (x_0, x_{t+1}) with slope sqrt((1 - ab_t) / (1 - ab_{t+1})), not the posterior's.
    x0, x_t, x_next = _pair_moments(schedule, t_level, True)
    slope, _ = _regress(x_t, x_next)
    ab = schedule.alphas_cumprod
    ddim = ((1 - ab[t_level]) / (1 - ab[t_level + 1])).sqrt()
    torch.testing.assert_close(slope, ddim.expand(2), rtol=1e-6, atol=0)
    posterior = schedule.posterior_mean(
        torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([t_level])
    )
    assert (slope - float(posterior)).abs().min() > 0.05
