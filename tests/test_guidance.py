"""Tests of cdrl.guidance.composed: classifier-free guidance and composition in one forward pass."""

from __future__ import annotations

import pytest
import torch

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
    torch.testing.assert_close(out, cond_net(x, level, null), rtol=0, atol=0)
    assert net.batches == [3]


def test_weight_one_is_the_plain_conditional(cond_net):
    x, level, null, cond, _ = _inputs()
    net = Counted(cond_net)
    out = composed(net, x, level, null=null, terms=[(cond, 1.0)])
    assert torch.equal(out, cond_net(x, level, cond))
    assert net.batches == [3]  # no null pass


def test_weight_zero_is_the_null_output(cond_net):
    x, level, null, cond, _ = _inputs()
    out = composed(cond_net, x, level, null=null, terms=[(cond, 0.0)])
    # the batched forward may round differently from a batch of 3: 1e-6 relative
    torch.testing.assert_close(out, cond_net(x, level, null), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cond_net(x, level, cond), cond_net(x, level, null), atol=1e-4)


@pytest.mark.parametrize("scale", [0.5, 1.7, 3.0, -1.0])
def test_guidance_interpolates_and_extrapolates(cond_net, scale):
    x, level, null, cond, _ = _inputs()
    net = Counted(cond_net)
    out = composed(net, x, level, null=null, terms=[(cond, scale)])
    expected = (1 - scale) * cond_net(x, level, null) + scale * cond_net(x, level, cond)
    # 1e-6 for 0 <= s <= 1; extrapolation amplifies the batched forward's float32 rounding
    atol = 1e-6 * (abs(scale) + abs(1 - scale))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=atol)
    assert net.batches == [6]  # one batched forward over [null; cond]
    assert out.shape == cond_net(x, level, null).shape


def test_two_terms_compose(cond_net):
    x, level, null, c1, c2 = _inputs()
    net = Counted(cond_net)
    w1, w2 = 2.0, -0.5  # a negative weight expresses NOT
    out = composed(net, x, level, null=null, terms=[(c1, w1), (c2, w2)])
    base = cond_net(x, level, null)
    expected = base + w1 * (cond_net(x, level, c1) - base) + w2 * (cond_net(x, level, c2) - base)
    atol = 1e-6 * (abs(w1) + abs(w2) + abs(1 - w1 - w2))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=atol)
    assert net.batches == [9]


def test_unconditional_model(tiny_ebm):
    x, level, null, cond, _ = _inputs()
    net = Counted(tiny_ebm)
    out = composed(net, x, level, null=None)
    assert torch.equal(out, tiny_ebm(x, level))
    assert net.batches == [3]
    with pytest.raises(ValueError, match="unconditional"):
        composed(tiny_ebm, x, level, null=None, terms=[(cond, 2.0)])


@pytest.mark.parametrize("w", [0.7, 2.0])
def test_guided_energy_gradient(tiny_cond_ebm, w):
    """guidance_scale = 1 + w gives grad E_w = (1 + w) grad E(c) - w grad E(null) (METHOD.md section 7)."""
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
