"""Guidance at sampling time and the Langevin noise scale (cdrl.sampling, cdrl.pipeline).

Classifier-free guidance with guidance_scale g = 1 + w acts on the initializer's proposal mean,
mu_w = (1 + w) mu(x, c) - w mu(x, null), and on the energy of the Langevin chain and of the Tweedie step,
E_w = (1 + w) E(c) - w E(null) (docs/method.md §7). ``cdrl.guidance.composed`` is tested on its own in
tests/test_guidance.py; here the sampler's use of it. ``langevin_noise_scale`` multiplies the Langevin
noise: with a quadratic energy the chain's stationary variance scales with its square, and 0 makes the
chain deterministic given its start.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import NUM_CLASSES, assert_close_float32, build_mlp_ebm
from torch import Tensor, nn

from cdrl.config import LangevinConfig
from cdrl.guidance import Conditioning
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.sampling import level, propose, sample, tweedie_denoise
from cdrl.schedule import cdrl_schedule
from cdrl.utils import randn_like

W = 0.7  # the paper's best ImageNet guidance weight; guidance_scale = 1 + W


def _labels(b: int) -> tuple[Tensor, Tensor]:
    """(null, cond) (b, 1): the null label and distinct class labels."""
    null = torch.full((b, 1), NUM_CLASSES)
    cond = (torch.arange(b)[:, None] * 3 + 1) % NUM_CLASSES
    return null, cond


# ----------------------------------------------------------------------------------------------------------
# The proposal mean.


def test_proposal_mean_is_guided(tiny_cond_initializer, randomize_output):
    init = randomize_output(tiny_cond_initializer)
    schedule = cdrl_schedule(6)
    b, t = 3, 2
    lvl = level(schedule, torch.full((b,), t), LangevinConfig())
    x_next = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    null, cond = _labels(b)
    with torch.no_grad():
        y = propose(
            init,
            x_next,
            lvl,
            null=null,
            terms=((cond, 1 + W),),
            generator=torch.Generator().manual_seed(1),
        )
        # the proposal noise is the generator's first draw
        eps = randn_like(x_next, torch.Generator().manual_seed(1))
        mean = y - lvl.proposal_std.view(-1, 1, 1, 1) * eps
        u_next = lvl.next_noise_level  # the initializer sees x_{t+1}'s noise level
        mu_cond, mu_null = init(x_next, u_next, cond), init(x_next, u_next, null)
    # composed's one forward over [null; cond] rounds differently from these two forwards
    assert_close_float32(mean, (1 + W) * mu_cond - W * mu_null)
    assert (mu_cond - mu_null).abs().max() > 1e-3  # the label matters, so guidance is seen


class _OffsetInitializer(nn.Module):
    """mu(x, c) = x + offset[c]: guidance then shifts the mean by g (offset[c] - offset[null])."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("offset", torch.randn(NUM_CLASSES + 1, 2, generator=gen))

    def forward(self, x: Tensor, noise_level: Tensor, cond: Tensor | None = None) -> Tensor:
        return x + self.offset[cond[:, 0]]


class _ZeroEnergy(nn.Module):
    def forward(self, y: Tensor, noise_level: Tensor, cond: Tensor | None = None) -> Tensor:
        return y.sum(1) * 0.0


def test_sample_guides_every_levels_proposal_mean():
    """Guided and unguided runs with the same noise differ by the guided shift, carried down the levels.

    With no Langevin steps x_t = (mu(x_{t+1}) + std eps_t) / scale_t; for mu(x, c) = x + offset[c] the
    two runs' difference obeys D_t = (D_{t+1} + g (offset[c] - offset[null])) / scale_t, D_T = 0.
    """
    schedule = cdrl_schedule(6)
    init = _OffsetInitializer()
    b, g = 4, 1 + W
    null, cond = _labels(b)
    settings = LangevinConfig(n_steps=0, tweedie=False)
    x_top = torch.randn(b, 2, generator=torch.Generator().manual_seed(0))

    def run(terms):
        return sample(
            _ZeroEnergy(),
            init,
            schedule,
            x_top,
            settings,
            cond=Conditioning(null=null, terms=terms),
            generator=torch.Generator().manual_seed(1),
        )

    shift = g * (init.offset[cond[:, 0]] - init.offset[null[:, 0]]).double()
    alphas = schedule.alphas_cumprod[1:] / schedule.alphas_cumprod[:-1]
    expected = torch.zeros(b, 2, dtype=torch.float64)
    for t in reversed(range(schedule.num_levels)):
        scale = 1.0 if t == schedule.num_levels - 1 else alphas[t].sqrt()
        expected = (expected + shift) / scale
    difference = (run(((cond, g),)) - run(())).double()
    assert_close_float32(difference, expected)


# ----------------------------------------------------------------------------------------------------------
# The Tweedie step.


def _guided_tweedie(ebm, schedule, x, null, cond, tweedie_b2):
    """x0_hat = (x - (1 - alphabar_0) grad_x E_w(scale_0 x) / s~_0^2) / sqrt(alphabar_0), from docs/method.md."""
    ab = schedule.alphas_cumprod
    alpha_1 = float(ab[1] / ab[0])
    s2 = tweedie_b2 * (1 - alpha_1)  # s~_0^2 = b^2 c_0^2 sigma_1^2, c_0 = 1
    u0 = schedule.noise_levels[0].float().expand(x.shape[0])
    leaf = x.detach().clone().requires_grad_(True)
    y = leaf * alpha_1**0.5
    energy = (1 + W) * ebm(y, u0, cond) - W * ebm(y, u0, null)
    (grad,) = torch.autograd.grad(energy.sum(), leaf)
    ab0 = float(ab[0])
    return (x - (1 - ab0) * grad / s2) / ab0**0.5


def test_tweedie_step_uses_the_guided_energy(tiny_cond_ebm):
    schedule = cdrl_schedule(6)
    b = 3
    null, cond = _labels(b)
    x = 0.5 * torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = LangevinConfig()
    out = tweedie_denoise(
        tiny_cond_ebm, schedule, x, settings, cond=Conditioning(null=null, terms=((cond, 1 + W),))
    )
    expected = _guided_tweedie(tiny_cond_ebm, schedule, x, null, cond, settings.tweedie_b2)
    plain = tweedie_denoise(
        tiny_cond_ebm, schedule, x, settings, cond=Conditioning(null=null, terms=((cond, 1.0),))
    )
    # float32 energies differentiated and scaled by (1 - alphabar_0) / s~_0^2 = 4.3
    assert_close_float32(out, expected, magnitude=10 * float(expected.abs().max()))
    assert (out - plain).abs().max() > 1e-3  # guidance changed the step


def test_sample_ends_with_the_guided_tweedie_step(tiny_cond_ebm, tiny_cond_initializer):
    """sample() with and without the Tweedie step draw the same noise; the step on the guided energy
    maps one onto the other."""
    schedule = cdrl_schedule(6)
    b = 2
    null, cond = _labels(b)
    x_top = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(tweedie: bool) -> Tensor:
        settings = LangevinConfig(n_steps=1, tweedie=tweedie)
        return sample(
            tiny_cond_ebm,
            tiny_cond_initializer,
            schedule,
            x_top,
            settings,
            cond=Conditioning(null=null, terms=((cond, 1 + W),)),
            generator=torch.Generator().manual_seed(1),
        )

    before = run(False)
    expected = _guided_tweedie(tiny_cond_ebm, schedule, before, null, cond, 2e-4)
    assert_close_float32(run(True), expected, magnitude=10 * float(expected.abs().max()))


# ----------------------------------------------------------------------------------------------------------
# langevin_noise_scale.

N_STEPS = 60


def _quadratic_pipeline(monkeypatch, **scheduler) -> CDRLPipeline:
    """A one-level DRL pipeline on 2-D vectors whose energy is E(y) = ||y||^2 / 10.

    One level is the top level: no tether, scale 1, step s_0 with s_0^2 = the tempering (step_scale
    1). The chain is then y <- y - (s_0^2 / 2) grad(E / s_0^2) + eta s_0 xi = 0.9 y + eta s_0 xi: a
    contraction of 0.9 per step whatever s_0, with stationary variance eta^2 s_0^2 / (1 - 0.81).
    """
    ebm = build_mlp_ebm()
    # The sampler calls energy(y, context) after context(noise level, cond) (the EnergyMLP's cached
    # context), so the energy is what is replaced.
    monkeypatch.setattr(ebm, "energy", lambda y, context: y.pow(2).sum(1) / 10.0)
    settings = {"num_levels": 1, "n_steps": N_STEPS, "tweedie": False, **scheduler}
    pipe = CDRLPipeline(ebm=ebm, initializer=None, scheduler=CDRLScheduler(**settings))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stationary_var(pipe: CDRLPipeline, noise_scale: float) -> float:
    s0 = float(pipe.scheduler.schedule.langevin_step_sizes(pipe.scheduler.config.b2)[0])
    return noise_scale**2 * s0**2 / (1 - 0.81)


@pytest.mark.parametrize("noise_scale", [1.0, 0.5])
def test_langevin_noise_scale_sets_the_stationary_variance(monkeypatch, noise_scale):
    pipe = _quadratic_pipeline(monkeypatch)
    n = 4000
    x = pipe(
        batch_size=n,
        langevin_noise_scale=noise_scale,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    # After 60 steps the start's variance (1, from x_T ~ N(0, I)) is down to 0.81^60 = 3e-6 of
    # itself, far below the stationary variance (2e-3 eta^2): the chain is stationary. The sample
    # variance over n = 4000 x 2 draws has standard error sqrt(2 / 8000) = 1.6% of the variance;
    # 5 of them (8%) against the 300% between noise scales 1 and 0.5.
    expected = _stationary_var(pipe, noise_scale)
    var = x.double().pow(2).mean().item()  # the mean is 0
    assert abs(var / expected - 1) < 5 * math.sqrt(2 / x.numel()), (var, expected)


def test_zero_noise_scale_makes_the_chain_deterministic(monkeypatch):
    """With eta = 0 the sample is 0.9^K x_T exactly: the stored setting, and the call's override."""
    x_top = randn_like(torch.empty(5, 2), torch.Generator().manual_seed(0))
    pipe = _quadratic_pipeline(monkeypatch, noise_scale=0.0, n_steps=10)
    x = pipe(batch_size=5, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(x, 0.9**10 * x_top, rtol=1e-5, atol=1e-7)
    noisy = pipe(
        batch_size=5,
        langevin_noise_scale=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert not torch.allclose(noisy, x, atol=1e-3)
