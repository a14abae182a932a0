"""Tests of cdrl.losses: the EBM's recovery-likelihood loss and the initializer's regression loss."""

from __future__ import annotations

import pytest
import torch

from cdrl.losses import ebm_loss, initializer_loss


def test_ebm_loss_value_sign_and_gradient():
    energy_pos = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    energy_neg = torch.tensor([1.5, 0.0, 1.0], requires_grad=True)
    weight = torch.tensor([1.0, 0.5, 0.25])
    loss, stats = ebm_loss(energy_pos, energy_neg, weight)
    # mean_b w (E(y+) - E(y-))
    expected = (1.0 * -1.0 + 0.5 * -1.0 + 0.25 * 1.0) / 3
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    torch.testing.assert_close(
        energy_pos.grad, weight / 3
    )  # +w / b: lowering E(y+) lowers the loss
    torch.testing.assert_close(energy_neg.grad, -weight / 3)
    assert stats["ebm/energy_pos"].item() == pytest.approx(0.5)
    assert stats["ebm/energy_neg"].item() == pytest.approx(2.5 / 3)
    assert stats["ebm/energy_gap"].item() == pytest.approx((1.0 + 1.0 - 1.0) / 3)
    assert all(not v.requires_grad for v in stats.values())


def test_ebm_loss_falls_when_positives_get_lower_energy():
    energy_neg = torch.zeros(4)
    weight = torch.ones(4)
    high, _ = ebm_loss(torch.ones(4), energy_neg, weight)
    low, _ = ebm_loss(torch.full((4,), -1.0), energy_neg, weight)
    assert low < high
    higher_neg, _ = ebm_loss(torch.ones(4), torch.full((4,), 3.0), weight)
    assert higher_neg < high  # raising the negatives' energy also lowers it


def test_ebm_loss_weights_apply_per_sample():
    energy_pos, energy_neg = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    only_first, _ = ebm_loss(energy_pos, energy_neg, torch.tensor([2.0, 0.0]))
    only_second, _ = ebm_loss(energy_pos, energy_neg, torch.tensor([0.0, 3.0]))
    assert only_first.item() == pytest.approx(1.0)
    assert only_second.item() == pytest.approx(1.5)


def test_initializer_loss_value_and_gradient_reaches_proposal_only():
    gen = torch.Generator().manual_seed(0)
    proposal = torch.randn(3, 1, 2, 2, generator=gen, requires_grad=True)
    y_neg = torch.randn(3, 1, 2, 2, generator=gen, requires_grad=True)
    loss, stats = initializer_loss(proposal, y_neg)
    diff = (y_neg - proposal).detach()
    expected = diff.pow(2).sum(dim=(1, 2, 3)).mean()  # sum over pixels, mean over the batch
    torch.testing.assert_close(loss, expected)
    assert stats["init/mse"].item() == pytest.approx(expected.item())
    loss.backward()
    assert y_neg.grad is None  # sg(y-)
    torch.testing.assert_close(proposal.grad, -2 * diff / 3)


def test_initializer_loss_through_a_reparameterized_proposal():
    mean = torch.zeros(2, 3, requires_grad=True)
    eps = torch.randn(2, 3)
    proposal = mean + 0.5 * eps
    y_neg = torch.ones(2, 3)
    loss, _ = initializer_loss(proposal, y_neg)
    loss.backward()
    torch.testing.assert_close(mean.grad, -2 * (y_neg - proposal.detach()) / 2)


def test_initializer_loss_data_weight_term():
    proposal = torch.zeros(2, 4, requires_grad=True)
    mean = torch.zeros(2, 4, requires_grad=True)
    y_neg = torch.ones(2, 4)
    y_pos = torch.full((2, 4), 2.0, requires_grad=True)
    base, base_stats = initializer_loss(proposal, y_neg, mean=mean, y_data=y_pos, data_weight=0.0)
    assert base.item() == pytest.approx(4.0) and "init/data_mse" not in base_stats
    loss, stats = initializer_loss(proposal, y_neg, mean=mean, y_data=y_pos, data_weight=0.5)
    # 4 + 0.5 * mean_b sum (2 - 0)^2 = 4 + 0.5 * 16
    assert loss.item() == pytest.approx(12.0)
    assert stats["init/data_mse"].item() == pytest.approx(16.0)
    loss.backward()
    torch.testing.assert_close(mean.grad, torch.full((2, 4), -0.5 * 2 * 2.0 / 2))
    assert y_pos.grad is None
