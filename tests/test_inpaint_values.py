"""The values inpainting writes into the known pixels (cdrl.sampling.reverse_step, CDRLPipeline).

docs/method.md §8: at every level the known pixels are the observation diffused forward to that level, in
y-space: y = scale_t x_t with x_t = sqrt(alphabar_t) x_obs + sqrt(1 - alphabar_t) eps (scale_t =
sqrt(alpha_{t+1}), 1 at the top level); at the end they are exactly the observation. The pipeline's
mask follows diffusers: 1 = repaint, 0 = keep. tests/test_sampling.py checks that the known pixels do
not move within a level and that the output keeps them; these tests check which values they hold.
"""

from __future__ import annotations

import math

import torch

import cdrl.pipeline as pipeline_module
from cdrl.config import LangevinConfig
from cdrl.sampling import sample
from cdrl.schedule import NoiseSchedule, cdrl_schedule


def _scales(schedule: NoiseSchedule) -> torch.Tensor:
    """scale_t = sqrt(alpha_{t+1}) for t = 0..T-1, 1 at the top level, from the alphas (float64)."""
    ab = schedule.alphas_cumprod
    scales = (ab[1:] / ab[:-1]).sqrt()
    scales[-1] = 1.0
    return scales


def test_known_pixels_hold_the_observation_diffused_with_each_levels_noise(
    tiny_ebm, tiny_initializer, randomize_output, monkeypatch
):
    randomize_output(tiny_initializer)
    schedule = cdrl_schedule(6)
    ab, scales = schedule.alphas_cumprod, _scales(schedule)
    gen = torch.Generator().manual_seed(0)
    known = torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1
    known_mask = torch.zeros(1, 1, 8, 8)
    known_mask[..., :, :3] = 1.0  # sampling's own convention: 1 = known
    keep = known_mask.expand_as(known).bool()

    # Record the noise each level diffuses the observation with.
    noises: dict[int, torch.Tensor] = {}
    real_q_sample = NoiseSchedule.q_sample

    def spy(self, x0, t, noise):
        if x0 is known:
            noises[int(t[0])] = noise.clone()
        return real_q_sample(self, x0, t, noise)

    monkeypatch.setattr(NoiseSchedule, "q_sample", spy)
    states: dict[int, list[torch.Tensor]] = {}
    out = sample(
        tiny_ebm,
        tiny_initializer,
        schedule,
        torch.randn(2, 1, 8, 8, generator=gen),
        LangevinConfig(n_steps=3),
        known=known,
        known_mask=known_mask,
        generator=gen,
        callback=lambda t, k, y: states.setdefault(t, []).append(y.clone()),
    )
    assert sorted(noises) == sorted(states) == list(range(6))
    for t, per_step in states.items():
        x_t = math.sqrt(ab[t]) * known.double() + math.sqrt(1 - ab[t]) * noises[t].double()
        expected = (scales[t] * x_t)[keep].float()
        for y in per_step:  # after every Langevin step
            # q_sample forms 1 - alphabar_t from float32 alphabar_t: at level 0 (1 - alphabar_0 =
            # 5.5e-5) that cancellation costs 1.5e-4 of the noise's std sqrt(1 - alphabar_0) = 0.0074,
            # a few 1e-6 here; any wrong level, scale or noise is off by more than 1e-2.
            torch.testing.assert_close(y[keep], expected, rtol=0, atol=1e-5)
        assert not torch.allclose(per_step[-1][~keep], (scales[t] * x_t)[~keep].float(), atol=1e-2)
    # A fresh draw per level (the observation is diffused anew at each level, not along one path).
    assert not torch.allclose(noises[0], noises[1])
    assert torch.equal(out[keep], known[keep])


def test_pipeline_known_pixels_follow_the_forward_marginal_and_end_at_the_observation(
    tiny_pipeline, monkeypatch
):
    """Through the pipeline (mask 1 = repaint): over many completions of one image, each level's kept
    pixels are distributed as the forward marginal N(scale_t sqrt(alphabar_t) x, scale_t^2 (1 -
    alphabar_t)); the output keeps them exactly."""
    pipe = tiny_pipeline
    schedule = pipe.scheduler.schedule
    ab, scales = schedule.alphas_cumprod, _scales(schedule)
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # in [0, 1]
    repaint = torch.zeros(1, 1, 8, 8)
    repaint[..., 2:6, 2:6] = 1.0  # the centre is repainted, the 48 pixels around it kept
    keep = repaint[0, 0] == 0
    observation = (image[0, 0] * 2 - 1)[keep].double()  # model units ([-1, 1], data_scale 1)

    # Wrap the pipeline's sampler to see the chain's state after every Langevin step.
    last: dict[int, torch.Tensor] = {}
    real_sample = pipeline_module.sample

    def spy(*args, callback=None, **kwargs):
        def record(t, k, y):
            last[t] = y[:, 0][:, keep].double()  # (n, 48): the latest state of level t
            callback(t, k, y)

        return real_sample(*args, callback=record, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample", spy)
    n = 256
    out = pipe(
        image=image,
        mask_image=repaint,
        num_samples_per_image=n,
        output_type="pt",
        generator=torch.Generator().manual_seed(1),
    ).images
    assert sorted(last) == list(range(schedule.num_levels))
    for t, y in last.items():
        # Standardized, the kept values are N(0, 1) draws: n x 48 = 12288 of them, their mean within
        # 5 standard errors (5 / sqrt(12288) = 0.045) of 0 and their mean square within 5 standard
        # errors (5 sqrt(2 / 12288) = 0.064) of 1. The level above or below (alphabar 0.94 -> 0.77 ->
        # 0.54 ...), an unscaled y or an undiffused observation are all far outside.
        std = scales[t] * math.sqrt(1 - ab[t])
        z = (y - scales[t] * math.sqrt(ab[t]) * observation) / std
        assert abs(z.mean().item()) < 5 / math.sqrt(z.numel()), (t, z.mean().item())
        assert abs(z.pow(2).mean().item() - 1) < 5 * math.sqrt(2 / z.numel()), (t, z.var().item())
    # The output keeps the observation, to float32 rounding of the [-1, 1] -> [0, 1] round trip.
    kept = out[:, 0][:, keep]
    torch.testing.assert_close(kept, image[0, 0][keep].expand_as(kept), rtol=0, atol=1e-6)
    assert (out[:, 0][:, ~keep] - image[0, 0][~keep]).abs().max() > 0.01  # the hole was repainted
