"""The Langevin sampler's contract (cdrl.langevin.langevin_refine), written once.

Most checks use a quadratic energy E(y) = ||y - m||^2 / (2 v), whose recovery conditional with a tether
N(x_next, sigma^2) is the product of two Gaussians: mean (v x_next + sigma^2 m) / (v + sigma^2), variance
v sigma^2 / (v + sigma^2).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from cdrl.langevin import langevin_refine, recovery_energy


def quadratic(m: float | torch.Tensor, v: float):
    def energy(y):
        return (y - m).flatten(1).pow(2).sum(1) / (2 * v)

    return energy


def per_sample(value: float, b: int, dtype=torch.float32) -> torch.Tensor:
    return torch.full((b,), value, dtype=dtype)


def run_chain(energy, y, x_next, *, sigma, tether, step, n_steps, **kwargs):
    b = y.shape[0]
    return langevin_refine(
        energy,
        y,
        x_next,
        sigma=per_sample(sigma, b, y.dtype),
        tether=per_sample(tether, b, y.dtype),
        step_size=per_sample(step, b, y.dtype),
        n_steps=n_steps,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("tether", "step", "expected_mean", "tau2"),
    [
        # m = 1, v = 0.5, x_next = -1, sigma^2 = 0.25
        (1.0, 0.08, (0.5 * -1.0 + 0.25 * 1.0) / 0.75, 0.5 * 0.25 / 0.75),
        (0.0, 0.15, 1.0, 0.5),  # no tether: the marginal N(m, v)
    ],
)
def test_long_chain_matches_the_gaussian_conditional(tether, step, expected_mean, tau2):
    m, v, sigma = 1.0, 0.5, 0.5
    b, d, n_steps = 2000, 4, 500
    gen = torch.Generator().manual_seed(0)
    x_next = torch.full((b, d), -1.0, dtype=torch.float64)
    y0 = torch.randn(b, d, generator=gen, dtype=torch.float64) * 2 + 3  # far from the target
    # ULA with step s on N(mu, tau^2) contracts by 1 - s^2 / (2 tau^2) per step (here >= 0.0192, so
    # 500 steps forget the start) and is stationary at N(mu, tau^2 / (1 - s^2 / (4 tau^2))).
    assert n_steps * step**2 / (2 * tau2) > 9
    y = run_chain(
        quadratic(m, v),
        y0,
        x_next,
        sigma=sigma,
        tether=tether,
        step=step,
        n_steps=n_steps,
        generator=gen,
    )
    assert y.shape == y0.shape and torch.isfinite(y).all()
    se = (tau2 / (b * d)) ** 0.5
    assert abs(y.mean().item() - expected_mean) < 4 * se
    ula_var = tau2 / (1 - step**2 / (4 * tau2))
    assert ula_var == pytest.approx(tau2, rel=0.015)  # the discretization bias is small
    assert y.var().item() == pytest.approx(ula_var, rel=0.05)  # SE ~ 1.6 %


def test_three_deterministic_steps_by_hand():
    # 1-D: E(y) = (y - 1)^2 / 4 (m = 1, v = 2), tether to x_next = 0 with sigma = 1, s = 0.5.
    # grad U = (y - 1) / 2 + y, so y <- y - 0.125 grad U = 0.8125 y + 0.0625:
    # 3 -> 2.5 -> 2.09375 -> 1.763671875
    seen = []
    y = run_chain(
        quadratic(1.0, 2.0),
        torch.tensor([[3.0]], dtype=torch.float64),
        torch.zeros(1, 1, dtype=torch.float64),
        sigma=1.0,
        tether=1.0,
        step=0.5,
        n_steps=3,
        noise=False,
        callback=lambda k, y: seen.append((k, y.item())),
    )
    assert seen == [(0, 2.5), (1, 2.09375), (2, 1.763671875)]
    assert y.item() == 1.763671875


def test_recovery_energy_formula():
    y = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    x_next = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    energy = torch.tensor([0.5, -1.0])
    out = recovery_energy(energy, y, x_next, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([0.5 + 5 / 2, -1.0 + 25 / 8]))
    out = recovery_energy(energy, y, x_next, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(out, energy)


def test_noise_free_chain_decreases_the_total_energy():
    gen = torch.Generator().manual_seed(1)
    b, f64 = 8, torch.float64
    m = torch.randn(b, 3, generator=gen, dtype=f64)
    x_next = torch.randn(b, 3, generator=gen, dtype=f64)
    sigma = per_sample(0.7, b, f64)
    tether = per_sample(1.0, b, f64)

    def energy(y):  # smooth, non-quadratic
        return torch.log(torch.cosh(2 * (y - m))).sum(1) + 0.1 * y.pow(2).sum(1)

    def total(y):
        return recovery_energy(energy(y), y, x_next, sigma, tether)

    values = []
    y0 = 3 * torch.randn(b, 3, generator=gen, dtype=f64)
    langevin_refine(
        energy,
        y0,
        x_next,
        sigma=sigma,
        tether=tether,
        step_size=per_sample(0.3, b, f64),
        n_steps=20,
        noise=False,
        callback=lambda k, y: values.append(total(y)),
    )
    values = torch.stack([total(y0), *values])  # (21, b)
    assert (values[1:] < values[:-1]).all()


def _ebm_energy(ebm, b):
    level = torch.full((b,), 0.4)

    def fn(y):
        return ebm(y, level) / 0.01

    return fn


def test_output_detached_finite_and_parameter_grads_untouched(tiny_ebm):
    tiny_ebm.train()  # gradients enabled on parameters, as during training
    assert all(p.requires_grad for p in tiny_ebm.parameters())
    b = 3
    x_next = torch.randn(b, 1, 8, 8)
    y0 = (x_next + 0.1 * torch.randn(b, 1, 8, 8)).requires_grad_(True)
    out = run_chain(
        _ebm_energy(tiny_ebm, b),
        y0,
        x_next,
        sigma=0.3,
        tether=1.0,
        step=0.05,
        n_steps=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == y0.shape and out.dtype == y0.dtype
    assert torch.isfinite(out).all()
    assert out.grad_fn is None and not out.requires_grad
    assert all(p.grad is None for p in tiny_ebm.parameters())
    assert y0.grad is None
    assert not torch.equal(out, y0.detach())


def test_per_sample_generators_make_samples_batch_independent(tiny_ebm):
    x_next = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    seeds = [11, 12, 13, 14]

    def chain(idx):
        b = len(idx)
        return run_chain(
            _ebm_energy(tiny_ebm, b),
            x_next[idx].clone(),
            x_next[idx],
            sigma=0.3,
            tether=1.0,
            step=0.05,
            n_steps=5,
            generator=[torch.Generator().manual_seed(seeds[i]) for i in idx],
        )

    full = chain([0, 1, 2, 3])
    for i in range(4):
        torch.testing.assert_close(chain([i])[0], full[i], rtol=0, atol=1e-6)
    torch.testing.assert_close(chain([2, 3]), full[2:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="generators"):
        run_chain(
            _ebm_energy(tiny_ebm, 4),
            x_next,
            x_next,
            sigma=0.3,
            tether=1.0,
            step=0.05,
            n_steps=1,
            generator=[torch.Generator()] * 3,
        )


def test_same_generator_seed_same_chain():
    x_next = torch.zeros(5, 2)

    def chain():
        return run_chain(
            quadratic(1.0, 1.0),
            torch.zeros(5, 2),
            x_next,
            sigma=1.0,
            tether=1.0,
            step=0.1,
            n_steps=10,
            generator=torch.Generator().manual_seed(42),
        )

    assert torch.equal(chain(), chain())  # bit-exact: same seed, batch and process


def test_known_entries_are_kept_at_every_step():
    gen = torch.Generator().manual_seed(5)
    b = 6
    known = torch.randn(b, 1, 4, 4, generator=gen)
    mask = (torch.rand(1, 1, 4, 4, generator=gen) < 0.5).float()  # broadcast over the batch
    assert 0 < mask.sum() < mask.numel()
    x_next = torch.randn(b, 1, 4, 4, generator=gen)
    keep = mask.expand_as(known).bool()
    states = []

    def check(k, y):
        assert torch.equal(y[keep], known[keep])  # bit-exact: known entries are copied in
        states.append(y.clone())

    out = run_chain(
        quadratic(0.5, 1.0),
        x_next.clone(),
        x_next,
        sigma=0.5,
        tether=1.0,
        step=0.2,
        n_steps=6,
        known=known,
        known_mask=mask,
        generator=gen,
        callback=check,
    )
    assert len(states) == 6
    assert torch.equal(out[keep], known[keep])  # bit-exact: copied, as above
    assert not torch.equal(out[~keep], x_next[~keep])  # the free entries moved


class _SavedTensorCounter:
    """Counts tensors saved for backward that are still alive (held by some autograd graph)."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.total = 0

    def pack(self, tensor):
        counter = self

        class Packed:
            def __init__(self, t):
                self.t = t
                counter.live += 1
                counter.total += 1
                counter.peak = max(counter.peak, counter.live)

            def __del__(self):
                counter.live -= 1

        return Packed(tensor)

    @staticmethod
    def unpack(packed):
        return packed.t


def _saved_tensor_peaks(ebm, steps=(1, 5, 60)):
    b = 2
    x_next = torch.randn(b, 1, 8, 8)
    peaks, totals = {}, {}
    for n_steps in steps:
        counter = _SavedTensorCounter()
        with saved_tensors_hooks(counter.pack, counter.unpack):
            out = run_chain(
                _ebm_energy(ebm, b),
                x_next.clone(),
                x_next,
                sigma=0.3,
                tether=1.0,
                step=0.05,
                n_steps=n_steps,
            )
        assert out.grad_fn is None
        assert counter.live == 0  # nothing outlives the call
        peaks[n_steps], totals[n_steps] = counter.peak, counter.total
    assert totals[60] == 60 * totals[1] > 0  # the hooks saw every step
    return peaks


def test_memory_does_not_grow_with_n_steps(tiny_ebm):
    """Each step's graph is freed before the next: the peak of live saved tensors is one step's."""
    tiny_ebm.requires_grad_(False)  # as under cdrl.sampling.frozen
    peaks = _saved_tensor_peaks(tiny_ebm)
    assert peaks[1] == peaks[5] == peaks[60]


def test_memory_bounded_when_parameters_require_grad(tiny_ebm):
    # With trainable parameters the graph also holds the parameter-side nodes, which the input-only
    # backward does not free; they live until the next step replaces the graph, so the peak is below
    # two steps' worth and flat in n_steps.
    peaks = _saved_tensor_peaks(tiny_ebm)
    assert peaks[5] == peaks[60] < 2 * peaks[1]
