"""Out-of-distribution detection with the lowest-level energy, scored by AUROC (CDRL Sec. 5, Table 5), or
with any other score where lower means more likely (``ood_report(..., score=...)``: the density bound's
negative log-likelihood, ``cdrl-evaluate --ood_score nll``).

The score of x_0 is the level-0 EBM's energy of y = sqrt(alpha_1) x_0, the recovery conditional's
energy term without its Gaussian tether (there is no x_1 to tether to): the same evaluation of the EBM
as the final Tweedie step of sampling. Lower energy means more likely, so in-distribution data should
score lower; the AUROC is the probability that a random in-distribution example has a lower energy
than a random out-of-distribution one (0.5: no separation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor
from tqdm.auto import tqdm

from cdrl.guidance import composed, null_condition
from cdrl.sampling import frozen

if TYPE_CHECKING:
    from cdrl.pipeline import CDRLPipeline


@torch.no_grad()
def lowest_level_energy(
    pipeline: CDRLPipeline,
    x0: Tensor,
    *,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """Energies E(sqrt(alpha_1) x_0, u'_0) of clean data under the level-0 EBM (DRL Eq. (5) at t = 0).

    A class-conditional EBM is evaluated with the null label: the unconditional model.

    Args:
        pipeline: a ``CDRLPipeline`` (its EBM, schedule and data scale are used).
        x0: (n, ...) data in data units (images in [-1, 1]).
        batch_size: examples per forward.
        on_batch: called with the number of examples after each forward (a progress bar's update).

    Returns:
        (n,) float64 energies on the CPU (the network's output, not divided by the Langevin temperature).
    """
    ebm, device = pipeline.ebm, pipeline.device
    schedule = pipeline.scheduler.schedule
    data_scale = float(pipeline.scheduler.config.data_scale)
    scale = float(schedule.y_scales[0])  # sqrt(alpha_1); 1 when level 0 is also the top (T = 1)
    noise_level = float(schedule.noise_levels[0])
    sizes = pipeline.condition_sizes
    energies = []
    with frozen(ebm):
        for chunk in x0.split(batch_size):
            b = chunk.shape[0]
            y = chunk.to(device, torch.float32) * (data_scale * scale)
            null = null_condition(sizes, b, device) if sizes else None
            levels = torch.full((b,), noise_level, device=device)
            energies.append(composed(ebm, y, levels, null=null).double().cpu())
            if on_batch is not None:
                on_batch(b)
    return torch.cat(energies) if energies else torch.zeros(0, dtype=torch.float64)


def auroc(energy_in: Tensor, energy_out: Tensor) -> float:
    """Area under the ROC curve for telling in-distribution (low energy) from OOD (high energy) data.

    Equals P(E_in < E_out) + P(E_in = E_out) / 2 over random pairs (the Mann-Whitney statistic).

    Args:
        energy_in: (n,) energies of in-distribution examples.
        energy_out: (m,) energies of out-of-distribution examples.

    Returns:
        The AUROC in [0, 1].
    """
    if energy_in.numel() == 0 or energy_out.numel() == 0:
        raise ValueError("AUROC needs at least one in-distribution and one OOD example")
    is_in = torch.cat([torch.ones(energy_in.numel()), torch.zeros(energy_out.numel())])
    score = -torch.cat(
        [energy_in.flatten(), energy_out.flatten()]
    ).double()  # higher = more in-distribution
    if not torch.isfinite(score).all():
        raise FloatingPointError("non-finite energies: the EBM diverged on some inputs")
    return float(roc_auc_score(is_in.numpy(), score.numpy()))


def ood_report(
    pipeline: CDRLPipeline,
    x_in: Tensor,
    x_out: dict[str, Tensor],
    *,
    batch_size: int = 256,
    progress: bool = True,
    score: Callable[[Tensor], Tensor] | None = None,
    score_name: str = "energy",
) -> dict[str, Any]:
    """Scores of held-out in-distribution data and of OOD sets, and each set's AUROC.

    Args:
        pipeline: a ``CDRLPipeline``.
        x_in: (n, ...) held-out in-distribution data in data units.
        x_out: {name: (m, ...) OOD data in data units}.
        batch_size: examples per forward.
        progress: a progress bar on stderr over the examples of every set.
        score: (m, ...) data -> (m,) scores, lower = more likely; default the lowest-level energy
            (``lowest_level_energy``).
        score_name: what ``score`` computes, the prefix of the report's keys.

    Returns:
        JSON-ready: ``score`` (``score_name``), ``in_distribution`` ({num_examples, <score_name>_mean,
        <score_name>_std}) and ``out_of_distribution`` ({name: {num_examples, <score_name>_mean,
        <score_name>_std, auroc}}).
    """

    def summary(values: Tensor) -> dict[str, Any]:
        std = values.std().item() if values.numel() > 1 else 0.0
        return {
            "num_examples": values.numel(),
            f"{score_name}_mean": values.mean().item(),
            f"{score_name}_std": std,
        }

    total = len(x_in) + sum(len(x) for x in x_out.values())
    desc = "ood energies" if score is None else f"ood {score_name} scores"
    with tqdm(total=total, desc=desc, unit="example", disable=not progress) as bar:

        def scores(x: Tensor) -> Tensor:
            if score is None:
                return lowest_level_energy(pipeline, x, batch_size=batch_size, on_batch=bar.update)
            values = score(x).double().cpu()
            bar.update(len(x))
            return values

        scores_in = scores(x_in)
        scores_out = {name: scores(x) for name, x in x_out.items()}
    report: dict[str, Any] = {
        "score": score_name,
        "in_distribution": summary(scores_in),
        "out_of_distribution": {},
    }
    for name, values in scores_out.items():
        report["out_of_distribution"][name] = {
            **summary(values),
            "auroc": auroc(scores_in, values),
        }
    return report
