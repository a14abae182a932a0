"""Tests of the reverse chain (cdrl.sampling) and of CDRLPipeline / CDRLScheduler (cdrl.pipeline)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cdrl.config import Config, LangevinConfig
from cdrl.guidance import composed
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.sampling import (
    clip_proposal_mean,
    energy_fn,
    frozen,
    langevin_steps,
    level,
    reverse_step,
    sample,
    tweedie_denoise,
)
from cdrl.schedule import cdrl_schedule

NUM_CLASSES = 10  # the conftest's conditional models: condition_sizes=(10,)


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def pt(pipe, **kwargs):
    return pipe(output_type="pt", **kwargs).images


# ------------------------------------------------------------------ determinism


def test_same_seed_same_samples(tiny_pipeline):
    a = pt(tiny_pipeline, batch_size=3, generator=torch.Generator().manual_seed(0))
    b = pt(tiny_pipeline, batch_size=3, generator=torch.Generator().manual_seed(0))
    c = pt(tiny_pipeline, batch_size=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # bit-exact: same seed, batch and process
    assert not torch.equal(a, c)


@pytest.mark.parametrize("conditional", [False, True])
def test_per_sample_generators_make_samples_batch_invariant(
    tiny_pipeline, tiny_cond_pipeline, randomize_output, conditional
):
    pipe = tiny_cond_pipeline if conditional else tiny_pipeline
    randomize_output(pipe.initializer)
    seeds = [3, 1, 4, 1]  # a repeated seed gives a repeated sample
    labels = [2, 7, 7, 2]
    kwargs = {"guidance_scale": 1.5} if conditional else {}

    def draw(idx):
        extra = {"class_labels": [labels[i] for i in idx]} if conditional else {}
        gen = generators([seeds[i] for i in idx])
        return pt(pipe, batch_size=len(idx), generator=gen, **extra, **kwargs)

    four = draw([0, 1, 2, 3])
    two = torch.cat([draw([0, 1]), draw([2, 3])])
    torch.testing.assert_close(four, two, rtol=0, atol=1e-5)
    if conditional:
        assert not torch.allclose(four[1], four[3], atol=1e-3)  # same seed, different label
    else:
        torch.testing.assert_close(four[1], four[3], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ outputs


def test_output_types(tiny_pipeline):
    gen = torch.Generator().manual_seed(0)
    images = pt(tiny_pipeline, batch_size=2, generator=gen)
    assert images.shape == (2, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    array = tiny_pipeline(batch_size=2, generator=gen, output_type="np").images
    assert isinstance(array, np.ndarray) and array.shape == (2, 8, 8, 1)
    assert array.min() >= 0 and array.max() <= 1
    pil = tiny_pipeline(batch_size=2, generator=gen, output_type="pil").images
    assert len(pil) == 2 and all(isinstance(im, Image.Image) for im in pil)
    assert pil[0].size == (8, 8) and pil[0].mode == "L"
    (tupled,) = tiny_pipeline(batch_size=1, output_type="pt", return_dict=False)
    assert tupled.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="output_type"):
        tiny_pipeline(batch_size=1, output_type="latent")


def test_np_and_pt_agree(tiny_pipeline):
    a = pt(tiny_pipeline, batch_size=2, generator=torch.Generator().manual_seed(5))
    b = tiny_pipeline(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="np")
    np.testing.assert_array_equal(
        b.images, a.permute(0, 2, 3, 1).numpy()
    )  # bit-exact: one run, two views


def test_vector_pipeline(mlp_pipeline):
    assert mlp_pipeline.sample_shape == (2,)
    assert mlp_pipeline.condition_sizes == ()
    out = pt(mlp_pipeline, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 2) and torch.isfinite(out).all()
    array = mlp_pipeline(batch_size=5, generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_array_equal(
        array.images, out.numpy()
    )  # raw samples, not rescaled (bit-exact: same seed, batch and process)
    with pytest.raises(ValueError, match="vectors"):
        mlp_pipeline(batch_size=2, output_type="pil")


def test_properties(tiny_pipeline, tiny_cond_pipeline):
    assert tiny_pipeline.sample_shape == (1, 8, 8)
    assert tiny_pipeline.condition_sizes == ()
    assert tiny_cond_pipeline.condition_sizes == (NUM_CLASSES,)


# ------------------------------------------------------------------ arguments


def test_argument_errors(tiny_pipeline, tiny_cond_pipeline):
    with pytest.raises(ValueError, match="unconditional"):
        tiny_pipeline(class_labels=[1], output_type="pt")
    for bad in ([NUM_CLASSES], [-1], [0, 11]):
        with pytest.raises(ValueError, match="outside"):
            tiny_cond_pipeline(class_labels=bad, output_type="pt")
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_cond_pipeline(class_labels=[1], guidance_scale=-0.5, output_type="pt")
    with pytest.raises(ValueError, match="generators"):
        tiny_pipeline(batch_size=3, generator=generators([0, 1]), output_type="pt")


def test_class_labels_set_the_batch_and_matter(tiny_cond_pipeline):
    out = pt(tiny_cond_pipeline, class_labels=torch.tensor([1, 2]))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(
        ValueError, match="batch_size=7, but 2 class_labels"
    ):  # not silently ignored
        pt(tiny_cond_pipeline, batch_size=7, class_labels=torch.tensor([1, 2]))
    a = pt(tiny_cond_pipeline, class_labels=[1], generator=generators([0]), guidance_scale=3.0)
    b = pt(tiny_cond_pipeline, class_labels=[8], generator=generators([0]), guidance_scale=3.0)
    assert not torch.allclose(a, b, atol=1e-4)


def test_guidance_scale_zero_is_the_unconditional_model(tiny_cond_pipeline, randomize_output):
    randomize_output(tiny_cond_pipeline.initializer)
    seeds = [0, 1]
    uncond = pt(tiny_cond_pipeline, batch_size=2, generator=generators(seeds))
    zero = pt(
        tiny_cond_pipeline, class_labels=[3, 6], guidance_scale=0.0, generator=generators(seeds)
    )
    plain = pt(
        tiny_cond_pipeline, class_labels=[3, 6], guidance_scale=1.0, generator=generators(seeds)
    )
    torch.testing.assert_close(zero, uncond, rtol=0, atol=1e-4)
    assert not torch.allclose(plain, uncond, atol=1e-3)


def test_zero_langevin_steps(tiny_pipeline):
    out0 = pt(
        tiny_pipeline,
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_langevin_steps=0,
    )
    out3 = pt(tiny_pipeline, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert out0.shape == (2, 1, 8, 8) and torch.isfinite(out0).all()
    assert not torch.equal(out0, out3)


def test_drl_pipeline_without_initializer(tiny_ebm):
    scheduler = CDRLScheduler(kind="drl", n_steps=3, b2=2e-4, tweedie=False)
    pipe = CDRLPipeline(ebm=tiny_ebm, initializer=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.initializer is None
    out = pt(pipe, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def _public(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k[0] != "_"}


@pytest.mark.parametrize("drl", [False, True])
def test_pipeline_save_load_round_trip(tiny_cond_pipeline, randomize_output, tmp_path, drl):
    pipe = tiny_cond_pipeline
    if drl:
        scheduler = CDRLScheduler(kind="drl", num_levels=4, n_steps=2, tweedie=False)
        pipe = CDRLPipeline(ebm=pipe.ebm, initializer=None, scheduler=scheduler)
    else:
        randomize_output(pipe.initializer)
    pipe.save_pretrained(tmp_path)
    # diffusers' default meta-device loading is slow with spectral norm: exercise it once
    loaded = CDRLPipeline.from_pretrained(tmp_path, low_cpu_mem_usage=not drl)
    loaded.set_progress_bar_config(disable=True)
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    assert _public(loaded.ebm.config) == _public(pipe.ebm.config)
    assert (loaded.initializer is None) == drl
    kwargs = {"class_labels": [0, 9], "guidance_scale": 2.0, "output_type": "pt"}
    a = pipe(generator=generators([0, 1]), **kwargs).images
    b = loaded(generator=generators([0, 1]), **kwargs).images
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)  # reloading may reorder float ops


# ------------------------------------------------------------------ scheduler


def test_scheduler_settings_and_training_config():
    scheduler = CDRLScheduler(n_steps=7, b2=1e-4, tweedie=False)
    settings = scheduler.langevin_settings()
    assert settings == LangevinConfig(n_steps=7, b2=1e-4, tweedie=False)
    assert scheduler.langevin_settings(n_steps=0, noise=None).n_steps == 0
    assert scheduler.schedule.num_levels == 6
    cfg = Config()
    cfg.schedule.num_levels = 4
    cfg.langevin.n_steps = 9
    from_cfg = CDRLScheduler.from_training_config(cfg)
    assert from_cfg.schedule.num_levels == 4
    assert from_cfg.langevin_settings() == dataclasses.replace(cfg.langevin)


# ------------------------------------------------------------------ the chain itself


def test_level_constants():
    schedule = cdrl_schedule(6)
    t = torch.tensor([0, 3, 5])
    lvl = level(schedule, t, LangevinConfig(b2=4e-4))
    steps = schedule.langevin_step_sizes(4e-4)[t].float()
    torch.testing.assert_close(lvl.step_size, steps)
    torch.testing.assert_close(lvl.temperature, steps**2)  # log p = f / s_t^2 - tether
    scaled = level(schedule, t, LangevinConfig(b2=4e-4, step_scale=2.0))
    torch.testing.assert_close(scaled.step_size, 2.0 * steps)
    torch.testing.assert_close(lvl.sigma, schedule.sigmas[t + 1].float())
    torch.testing.assert_close(lvl.scale, schedule.y_scales[t].float())
    assert lvl.tether.tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(lvl.noise_level, schedule.noise_levels[t].float())
    torch.testing.assert_close(lvl.next_noise_level, schedule.noise_levels[t + 1].float())
    untempered = level(schedule, t, LangevinConfig(tempered=False))
    assert untempered.temperature.tolist() == [1.0, 1.0, 1.0]


def test_step_scale_changes_the_step_not_the_target():
    schedule = cdrl_schedule(6)
    t = torch.arange(6)
    base = level(schedule, t, LangevinConfig(step_scale=1.0))
    scaled = level(schedule, t, LangevinConfig(step_scale=0.5))
    torch.testing.assert_close(scaled.step_size, 0.5 * base.step_size)
    torch.testing.assert_close(scaled.temperature, base.temperature)


@pytest.mark.parametrize("t", [0, 3, 5])
def test_clip_proposal_mean_is_the_posterior_mean_of_the_clamped_x0(t):
    schedule = cdrl_schedule(6)
    levels = torch.full((4,), t)
    scale = schedule.y_scales[t].float()
    x0 = torch.linspace(-3, 3, 4 * 64).reshape(4, 1, 8, 8)  # a third of it outside [-1, 1]
    x_next = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(t))
    mean = scale * schedule.posterior_mean(x0, x_next, levels)
    clipped = clip_proposal_mean(schedule, t, mean, x_next, scale, 1.0)
    expected = scale * schedule.posterior_mean(x0.clamp(-1, 1), x_next, levels)
    torch.testing.assert_close(clipped, expected, rtol=1e-4, atol=1e-4)
    inside = (x0.abs() <= 1).expand_as(mean)
    torch.testing.assert_close(clipped[inside], mean[inside], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(clipped, mean, atol=1e-3)


def test_clip_sample_changes_samples_only_when_asked(tiny_pipeline, randomize_output):
    randomize_output(tiny_pipeline.initializer, std=2.0)  # means far outside the data range
    kwargs = {"batch_size": 4, "num_langevin_steps": 0}
    plain = pt(tiny_pipeline, generator=torch.Generator().manual_seed(0), **kwargs)
    off = pt(tiny_pipeline, generator=torch.Generator().manual_seed(0), clip_sample=False, **kwargs)
    on = pt(tiny_pipeline, generator=torch.Generator().manual_seed(0), clip_sample=True, **kwargs)
    assert torch.equal(plain, off)  # off by default
    assert not torch.allclose(plain, on, atol=1e-3)
    with pytest.raises(ValueError, match="clip_sample must be True or False"):
        tiny_pipeline(batch_size=1, clip_sample="yes")


def test_langevin_steps_refine_only_the_top_levels():
    assert [langevin_steps(LangevinConfig(n_steps=3), t, 6) for t in range(6)] == [3] * 6
    top2 = LangevinConfig(n_steps=3, refine_top=2)
    assert [langevin_steps(top2, t, 6) for t in range(6)] == [0, 0, 0, 0, 3, 3]
    assert [langevin_steps(LangevinConfig(refine_top=0), t, 6) for t in range(6)] == [0] * 6


def test_refine_top_in_the_pipeline(tiny_pipeline, randomize_output):
    randomize_output(tiny_pipeline.initializer)
    levels = tiny_pipeline.scheduler.schedule.num_levels

    def draw(**kwargs):
        return pt(tiny_pipeline, batch_size=3, generator=torch.Generator().manual_seed(0), **kwargs)

    plain = draw()
    torch.testing.assert_close(draw(refine_top=levels), plain, rtol=0, atol=0)
    torch.testing.assert_close(draw(refine_top=0), draw(num_langevin_steps=0), rtol=0, atol=0)
    top2 = draw(refine_top=2)
    assert not torch.equal(top2, plain) and not torch.equal(top2, draw(refine_top=0))
    # stored in the scheduler like the other sampling settings
    tiny_pipeline.scheduler.register_to_config(refine_top=2)
    torch.testing.assert_close(draw(), top2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="refine_top"):
        draw(refine_top=levels + 1)


def test_energy_fn_is_the_tempered_energy(tiny_ebm):
    schedule = cdrl_schedule(6)
    lvl = level(schedule, torch.tensor([1, 2]), LangevinConfig())
    y = torch.randn(2, 1, 8, 8)
    expected = tiny_ebm(y, lvl.noise_level) / lvl.temperature
    torch.testing.assert_close(energy_fn(tiny_ebm, lvl)(y), expected)


def test_drl_chain_starts_at_x_next(tiny_ebm):
    schedule = cdrl_schedule(6)
    x_next = torch.randn(2, 1, 8, 8)
    settings = LangevinConfig(n_steps=0)
    for t in (0, 5):
        out = reverse_step(tiny_ebm, None, schedule, x_next, t, settings)
        torch.testing.assert_close(out, x_next / schedule.y_scales[t].float(), rtol=0, atol=0)


def test_sample_callback_walks_down_the_levels(tiny_ebm, tiny_initializer):
    schedule = cdrl_schedule(3)
    calls = []
    settings = LangevinConfig(n_steps=2)
    x = sample(
        tiny_ebm,
        tiny_initializer,
        schedule,
        torch.randn(2, 1, 8, 8),
        settings,
        callback=lambda t, k, y: calls.append((t, k, y.shape)),
    )
    assert x.shape == (2, 1, 8, 8) and x.grad_fn is None
    assert [(t, k) for t, k, _ in calls] == [(2, 0), (2, 1), (1, 0), (1, 1), (0, 0), (0, 1)]


@pytest.mark.parametrize("tweedie", [True, False])
def test_inpainting_keeps_known_pixels_exactly(
    tiny_ebm, tiny_initializer, randomize_output, tweedie
):
    randomize_output(tiny_initializer)
    schedule = cdrl_schedule(6)
    gen = torch.Generator().manual_seed(0)
    known = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, :, :4] = 1.0  # left half known
    x = sample(
        tiny_ebm,
        tiny_initializer,
        schedule,
        torch.randn(3, 1, 8, 8, generator=gen),
        LangevinConfig(n_steps=3, tweedie=tweedie),
        known=known,
        known_mask=mask,
        generator=gen,
    )
    keep = mask.bool()
    assert torch.equal(x[keep], known[keep])  # bit-exact: known pixels are copied in
    assert torch.isfinite(x).all()
    assert not torch.allclose(x[~keep], known[~keep], atol=1e-2)


def test_inpainting_constrains_every_langevin_step(tiny_ebm, tiny_initializer):
    # in y-space the known pixels sit at scale * q_sample(known, t): between steps they never move
    schedule = cdrl_schedule(6)
    known = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = (torch.rand(1, 1, 8, 8) < 0.5).float()
    keep = mask.expand_as(known).bool()
    states: dict[int, list[torch.Tensor]] = {}
    sample(
        tiny_ebm,
        tiny_initializer,
        schedule,
        torch.randn(2, 1, 8, 8),
        LangevinConfig(n_steps=4),
        known=known,
        known_mask=mask,
        callback=lambda t, k, y: states.setdefault(t, []).append(y[keep].clone()),
    )
    assert sorted(states) == list(range(6))
    for per_step in states.values():
        assert len(per_step) == 4
        assert all(
            torch.equal(s, per_step[0]) for s in per_step
        )  # bit-exact: copied, never computed


# ------------------------------------------------------------------ frozen


def test_frozen_restores_mode_and_flags(tiny_ebm, tiny_initializer):
    tiny_ebm.train()
    tiny_initializer.eval()
    params = list(tiny_ebm.parameters())
    params[0].requires_grad_(False)
    flags = [p.requires_grad for p in tiny_ebm.parameters()]
    with frozen(tiny_ebm, tiny_initializer, None):
        assert not tiny_ebm.training and not tiny_initializer.training
        assert not any(p.requires_grad for p in tiny_ebm.parameters())
        assert not any(p.requires_grad for p in tiny_initializer.parameters())
    assert tiny_ebm.training and not tiny_initializer.training
    assert [p.requires_grad for p in tiny_ebm.parameters()] == flags
    assert all(p.requires_grad for p in tiny_initializer.parameters())
    with pytest.raises(RuntimeError, match="boom"), frozen(tiny_ebm):
        raise RuntimeError("boom")
    assert tiny_ebm.training
    assert [p.requires_grad for p in tiny_ebm.parameters()] == flags


def test_frozen_restores_submodule_modes(tiny_ebm):
    tiny_ebm.train()
    tiny_ebm.blocks[0].eval()
    with frozen(tiny_ebm):
        pass
    assert tiny_ebm.training
    assert not tiny_ebm.blocks[0].training


def test_sampling_leaves_training_state_alone(tiny_pipeline):
    tiny_pipeline.ebm.train()
    buffers = {k: v.clone() for k, v in tiny_pipeline.ebm.state_dict().items()}
    pt(tiny_pipeline, batch_size=1)
    assert tiny_pipeline.ebm.training
    assert all(p.requires_grad and p.grad is None for p in tiny_pipeline.ebm.parameters())
    state = tiny_pipeline.ebm.state_dict()
    assert all(
        torch.equal(state[k], v) for k, v in buffers.items()
    )  # no power iterations (bit-exact: untouched buffers)


# ------------------------------------------------------------------ Tweedie


class _Quadratic(nn.Module):
    """E(y) = c ||y||^2 / 2, ignoring the noise level."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, y, noise_level, cond=None):
        return 0.5 * self.c * y.flatten(1).pow(2).sum(1)


def test_tweedie_with_zero_gradient_divides_by_sqrt_alphabar0():
    schedule = cdrl_schedule(6)
    x = torch.randn(4, 1, 8, 8)
    out = tweedie_denoise(_Quadratic(0.0), schedule, x, LangevinConfig())
    ab0 = schedule.alphas_cumprod[0].item()
    torch.testing.assert_close(out, x / ab0**0.5)
    assert out.grad_fn is None


def test_tweedie_score_scale():
    # score(x) = -grad_x E(scale_0 x) / s~^2 = -c scale_0^2 x / s~^2, s~ the level-0 step at tweedie_b2
    schedule = cdrl_schedule(6)
    c, settings = 1e-4, LangevinConfig(tweedie_b2=2e-4)
    x = torch.randn(2, 3, dtype=torch.float64)
    out = tweedie_denoise(_Quadratic(c), schedule, x, settings)
    ab0 = schedule.alphas_cumprod[0].item()
    s2 = schedule.langevin_step_sizes(2e-4)[0].item() ** 2
    scale2 = schedule.y_scales[0].item() ** 2
    expected = (x - (1 - ab0) * c * scale2 * x / s2) / ab0**0.5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ebm_fixture", ["tiny_cond_ebm", "mlp_cond_ebm"])
@pytest.mark.parametrize("weights", [(), (1.0,), (3.0,), (2.0, -1.0)])
def test_energy_fn_context_cache_matches_the_full_forward(ebm_fixture, weights, request):
    """The cached context (computed once per chain) gives the energies and gradients of full forwards."""
    ebm = request.getfixturevalue(ebm_fixture)
    b = 5
    sizes = ebm.config.condition_sizes
    gen = torch.Generator().manual_seed(0)
    shape = (b, 2) if ebm_fixture.startswith("mlp") else (b, 1, 8, 8)
    lvl = level(cdrl_schedule(6), torch.tensor([0, 1, 2, 5, 0]), LangevinConfig())
    null = torch.tensor(sizes).expand(b, -1).clone()
    terms = [
        (torch.stack([torch.randint(0, n, (b,), generator=gen) for n in sizes], dim=1), w)
        for w in weights
    ]

    def uncached(y):
        return composed(ebm, y, lvl.noise_level, null=null, terms=terms) / lvl.temperature

    fn = energy_fn(ebm, lvl, null=null, terms=terms)
    for _ in range(3):  # later calls reuse the first call's context
        y = torch.randn(shape, generator=gen, requires_grad=True)
        cached, full = fn(y), uncached(y)
        torch.testing.assert_close(cached, full)
        (g1,) = torch.autograd.grad(cached.sum(), y)
        (g2,) = torch.autograd.grad(uncached(y).sum(), y)
        torch.testing.assert_close(g1, g2)


def test_pipeline_bf16_precision_is_close_to_fp32(tiny_pipeline):
    """precision="bf16" autocasts the networks only; samples stay close to float32 (same noise)."""
    out = {
        p: tiny_pipeline(
            batch_size=4,
            generator=torch.Generator().manual_seed(0),
            num_langevin_steps=3,
            output_type="pt",
            precision=p,
        ).images
        for p in ("fp32", "bf16")
    }
    assert out["bf16"].dtype == torch.float32
    assert not torch.equal(out["bf16"], out["fp32"])
    assert (out["bf16"] - out["fp32"]).abs().max() <= 5e-2
    with pytest.raises(ValueError, match="precision"):
        tiny_pipeline(batch_size=1, precision="fp64")
