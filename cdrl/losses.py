"""The two cooperative losses: recovery likelihood for the EBM, regression onto refined samples for the initializer."""

from __future__ import annotations

from torch import Tensor


def ebm_loss(
    energy_pos: Tensor, energy_neg: Tensor, weight: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Recovery-likelihood loss, mean_b w_t (f(y-) - f(y+)) = mean_b w_t (E(y+) - E(y-)) (DRL Eq. (8), CDRL Alg. 1).

    Its gradient is the maximum-likelihood gradient of the recovery conditional, with the normalizer's
    gradient estimated by the negatives. Lowering the positives' energy lowers the loss.

    Args:
        energy_pos: (b,) E(y+) on the observed y+ = sqrt(alpha_{t+1}) x_t.
        energy_neg: (b,) E(y-) on the Langevin-refined negatives (detached inputs).
        weight: (b,) w_t = sigma_1 / sigma_{t+1}.

    Returns:
        The scalar loss and detached stats.
    """
    loss = (weight * (energy_pos - energy_neg)).mean()
    stats = {
        "ebm/energy_pos": energy_pos.mean().detach(),
        "ebm/energy_neg": energy_neg.mean().detach(),
        "ebm/energy_gap": (energy_neg - energy_pos).mean().detach(),
    }
    return loss, stats


def initializer_loss(
    proposal: Tensor,
    y_neg: Tensor,
    *,
    mean: Tensor | None = None,
    y_data: Tensor | None = None,
    data_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cooperative initializer loss, mean_b sum_pixels (sg(y-) - yhat)^2 (CDRL Eq. (9)).

    yhat = mu + std * eps carries gradient only through mu. With ``data_weight`` > 0 an extra regression
    of mu onto a data target is added, data_weight * mean_b sum (y_data - mu)^2: it teaches mu the
    recovery mean E[y | x_{t+1}] directly (off in the paper; see the README's section on small data).
    The caller picks the target (``train.init_data_target``): the paired y+ or the posterior mean.

    Args:
        proposal: (b, ...) yhat, differentiable through the initializer.
        y_neg: (b, ...) refined negatives.
        mean, y_data: (b, ...) mu and its data target, needed only when ``data_weight`` > 0.
        data_weight: weight of the extra regression.

    Returns:
        The scalar loss and detached stats.
    """
    mse = (y_neg.detach() - proposal).flatten(1).pow(2).sum(1).mean()
    stats = {"init/mse": mse.detach()}
    loss = mse
    if data_weight > 0:
        data_mse = (y_data.detach() - mean).flatten(1).pow(2).sum(1).mean()
        loss = loss + data_weight * data_mse
        stats["init/data_mse"] = data_mse.detach()
    return loss, stats
