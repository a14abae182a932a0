"""Tests of cdrl.guidance.composed: classifier-free guidance and composition in one forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_float32

from cdrl.guidance import composed

NUM_CLASSES = 10  # the conftest's conditional models: condition_sizes=(10,)


class Counted:
    """Wraps a network and counts its forward calls (and the batch size of each)."""

    def __init__(self, net):
        self.net = net
        self.batches: list[int] = []

    def __call__(self, x, noise_level, cond):
        self.batches.append(x.shape[0])
        return self.net(x, noise_level, cond)


def _inputs(b=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 8, 8, generator=gen)
    level = torch.rand(b, generator=gen)
    null = torch.full((b, 1), NUM_CLASSES)
    cond = torch.tensor([[1], [4], [7]])[:b]
    cond2 = torch.tensor([[2], [0], [9]])[:b]
    return x, level, null, cond, cond2


@pytest.fixture(params=["ebm", "initializer"])
def cond_net(request, tiny_cond_ebm, tiny_cond_initializer, randomize_output):
    if request.param == "ebm":
        return tiny_cond_ebm
    return randomize_output(tiny_cond_initializer)  # zero-init would make mu(c) == mu(null)


def test_no_terms_is_the_null_output(cond_net):
    x, level, null, cond, _ = _inputs()
    net = Counted(cond_net)
    out = composed(net, x, level, null=null)
    # bit-exact: no terms, one forward of the same batch of 3 (net.batches), in one process
    torch.testing.assert_close(out, cond_net(x, level, null), rtol=0, atol=0)
    assert net.batches == [3]


def test_weight_one_is_the_plain_conditional(cond_net):
    x, level, null, cond, _ = _inputs()
    net = Counted(cond_net)
    out = composed(net, x, level, null=null, terms=[(cond, 1.0)])
    assert torch.equal(out, cond_net(x, level, cond))  # bit-exact: one forward, the same batch of 3
    assert net.batches == [3]  # no null pass


def test_weight_zero_is_the_null_output(cond_net):
    x, level, null, cond, _ = _inputs()
    out = composed(cond_net, x, level, null=null, terms=[(cond, 0.0)])
    # the batched forward may round differently from a batch of 3
    assert_close_float32(out, cond_net(x, level, null))
    assert not torch.allclose(cond_net(x, level, cond), cond_net(x, level, null), atol=1e-4)


@pytest.mark.parametrize("scale", [0.5, 1.7, 3.0, -1.0])
def test_guidance_interpolates_and_extrapolates(cond_net, scale):
    x, level, null, cond, _ = _inputs()
    net = Counted(cond_net)
    out = composed(net, x, level, null=null, terms=[(cond, scale)])
    expected = (1 - scale) * cond_net(x, level, null) + scale * cond_net(x, level, cond)
    # the batched forward's float32 rounding, amplified by extrapolation (|s| + |1 - s| > 1)
    magnitude = float(cond_net(x, level, null).abs().max()) * (abs(scale) + abs(1 - scale))
    assert_close_float32(out, expected, magnitude=max(1.0, magnitude))
    assert net.batches == [6]  # one batched forward over [null; cond]
    assert out.shape == cond_net(x, level, null).shape


def test_two_terms_compose(cond_net):
    x, level, null, c1, c2 = _inputs()
    net = Counted(cond_net)
    w1, w2 = 2.0, -0.5  # a negative weight expresses NOT
    out = composed(net, x, level, null=null, terms=[(c1, w1), (c2, w2)])
    base = cond_net(x, level, null)
    expected = base + w1 * (cond_net(x, level, c1) - base) + w2 * (cond_net(x, level, c2) - base)
    magnitude = float(base.abs().max()) * (abs(w1) + abs(w2) + abs(1 - w1 - w2))
    assert_close_float32(out, expected, magnitude=max(1.0, magnitude))
    assert net.batches == [9]


def test_unconditional_model(tiny_ebm):
    x, level, null, cond, _ = _inputs()
    net = Counted(tiny_ebm)
    out = composed(net, x, level, null=None)
    assert torch.equal(out, tiny_ebm(x, level))  # bit-exact: one forward, the same batch of 3
    assert net.batches == [3]
    with pytest.raises(ValueError, match="unconditional"):
        composed(tiny_ebm, x, level, null=None, terms=[(cond, 2.0)])


@pytest.mark.parametrize("w", [0.7, 2.0])
def test_guided_energy_gradient(tiny_cond_ebm, w):
    """guidance_scale = 1 + w gives grad E_w = (1 + w) grad E(c) - w grad E(null) (docs/method.md §7)."""
    x, level, null, cond, _ = _inputs()

    def grad_of(fn):
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
        return grad

    guided = grad_of(lambda y: composed(tiny_cond_ebm, y, level, null=null, terms=[(cond, 1 + w)]))
    g_cond = grad_of(lambda y: tiny_cond_ebm(y, level, cond))
    g_null = grad_of(lambda y: tiny_cond_ebm(y, level, null))
    expected = (1 + w) * g_cond - w * g_null
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, g_cond, atol=1e-4)  # guidance changed the drift


def test_composed_gradient_is_per_sample(tiny_cond_ebm):
    # the batched forward must not mix samples: sample 0's gradient is the same alone or in a batch
    x, level, null, cond, _ = _inputs()

    def grad(idx):
        leaf = x[idx].clone().requires_grad_(True)
        out = composed(tiny_cond_ebm, leaf, level[idx], null=null[idx], terms=[(cond[idx], 2.5)])
        return torch.autograd.grad(out.sum(), leaf)[0]

    torch.testing.assert_close(grad([0]), grad([0, 1, 2])[:1], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- posterior negation


class Wells(torch.nn.Module):
    """A 2-D conditional energy with two attributes of 2 values (null = 2): E(y, c) = sum over the set
    conditions of |y_k - centre(c_k)|^2 / 2 (attribute k acts on coordinate k), 0 for null ones."""

    def forward(self, y, noise_level, cond):
        centres = torch.tensor([-1.0, 1.0, 0.0])  # value 0, value 1, null (unused)
        is_set = (cond < 2).float()
        return (is_set * (y - centres[cond]) ** 2 / 2).sum(1)


def _level(b, temperature=0.5):
    from cdrl.sampling import Level

    ones = torch.ones(b)
    return Level(
        noise_level=ones * 0.1,
        next_noise_level=ones * 0.2,
        scale=ones,
        sigma=ones,
        tether=ones,
        step_size=ones,
        temperature=ones * temperature,
        proposal_std=ones,
        loss_weight=ones,
    )


def test_log_prob_not_matches_the_softmax():
    from cdrl.guidance import log_prob_not

    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, -1.0, 0.5]])
    value = torch.tensor([2, 0])
    probs = logits.softmax(1)
    expected = torch.log(1 - probs[torch.arange(2), value])
    assert torch.allclose(log_prob_not(logits, value), expected, atol=1e-6)
    assert (log_prob_not(logits, value) <= 0).all()


def test_split_negated_keeps_positive_terms_and_checks_negated_ones():
    from cdrl.guidance import split_negated

    null = torch.full((3, 2), 2)
    x0 = torch.tensor([[0, 2]] * 3)  # attribute 0 = 0, attribute 1 null
    y1 = torch.tensor([[2, 1]] * 3)
    both = torch.tensor([[0, 1]] * 3)
    kept, negated = split_negated([(x0, -1.0), (y1, 2.0)], null, "linear")
    assert [w for _, w in kept] == [-1.0, 2.0] and negated == ()
    kept, negated = split_negated([(x0, -1.5), (y1, 2.0)], null, "posterior")
    assert len(kept) == 1 and kept[0][1] == 2.0 and len(negated) == 1
    term = negated[0]
    assert term.index == 0 and term.weight == 1.5 and term.value.tolist() == [0, 0, 0]
    assert term.alternatives.shape == (2, 3, 2)
    assert term.alternatives[:, 0].tolist() == [[0, 2], [1, 2]]
    with pytest.raises(ValueError, match="exactly one condition"):
        split_negated([(both, -1.0)], null, "posterior")
    with pytest.raises(ValueError, match="negation must be one of"):
        split_negated([(x0, -1.0)], null, "bounded")


def test_posterior_negation_energy_is_bounded_where_linear_is_not():
    from cdrl.guidance import log_prob_not
    from cdrl.sampling import energy_fn

    net, tau = Wells(), 0.5
    b = 5
    null = torch.full((b, 2), 2)
    not_x0 = torch.tensor([[0, 2]] * b)  # NOT attribute 0 = 0 (centre x = -1)
    y = torch.stack([torch.tensor([-1.0, 0.0, 1.0, 10.0, 100.0]), torch.zeros(b)], 1)
    offsets = [
        torch.tensor([0.0, 0.3]),
        torch.tensor([0.0, -7.0]),
    ]  # calibrated offsets per condition
    posterior = energy_fn(
        net,
        _level(b, tau),
        null=null,
        terms=[(not_x0, -2.0)],
        negation="posterior",
        offsets=offsets,
    )
    linear = energy_fn(net, _level(b, tau), null=null, terms=[(not_x0, -2.0)])
    # Posterior: E_null / tau - 2 log p(x != 0 | y), with p from softmax((-E(y, v) + offset_v) / tau) over
    # v = 0, 1 (attribute 0's offsets).
    logits = -torch.stack([net(y, None, torch.tensor([[v, 2]] * b)) for v in (0, 1)], 1) / tau
    logits = logits + offsets[0] / tau  # offsets are energies
    expected = net(y, None, null) / tau - 2 * log_prob_not(logits, torch.zeros(b, dtype=torch.long))
    assert torch.allclose(posterior(y), expected, atol=1e-5)
    uncalibrated = energy_fn(
        net,
        _level(b, tau),
        null=null,
        terms=[(not_x0, -2.0)],
        negation="posterior",
        offsets=[torch.zeros(2), torch.zeros(2)],
    )
    assert not torch.allclose(posterior(y), uncalibrated(y))
    with pytest.raises(ValueError, match="cdrl-calibrate"):
        energy_fn(net, _level(b, tau), null=null, terms=[(not_x0, -2.0)], negation="posterior")
    # Far on the x = +1 side the NOT is satisfied: the posterior term vanishes, the linear one keeps
    # lowering the energy without bound.
    assert posterior(y)[-1].abs() < 1e-3 and posterior(y)[0] > 1.0
    assert linear(y)[-1] < -1e4 and linear(y)[-1] < linear(y)[-2] < linear(y)[-3]
    # It pushes away from the negated well: the energy is highest at x = -1 and falls toward +1.
    assert posterior(y)[0] > posterior(y)[1] > posterior(y)[2]


def test_pipeline_posterior_negation(tiny_cond_ebm):
    from cdrl import CDRLPipeline
    from cdrl.pipeline import CDRLScheduler

    zeros = [[0.0] * tiny_cond_ebm.config.condition_sizes[0]] * 2
    scheduler = CDRLScheduler(num_levels=2, condition_offsets=[zeros])
    pipe = CDRLPipeline(ebm=tiny_cond_ebm, initializer=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=2,
        compose=[((3,), 2.0), ((5,), -1.0)],
        negation="posterior",
        num_langevin_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="negation must be one of"):
        pipe(batch_size=2, compose=[((5,), -1.0)], negation="bounded", output_type="pt")
