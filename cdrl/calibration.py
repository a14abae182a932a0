"""Calibrated offsets for the EBM's implicit classifier, which ``negation="posterior"`` needs.

A conditional EBM's energies define an implicit classifier at every level t:
p(c_k = v | y) = softmax_v((-E(y, t, c with c_k = v) + b[k][t, v]) / temperature_t), the other conditions
null. The offsets b are energies (the same units as E), so the classifier follows the temperature a step
uses (the Tweedie step's differs from Langevin's).
Recovery likelihood leaves the offsets b free: adding a constant to E(., t, c) for one value of c changes
no conditional p(y | x_{t+1}, c), so the training loss cannot see it (in practice the raw offsets differ
by thousands of temperature units). ``fit_condition_offsets`` fits them by maximum likelihood of the true
labels of training data diffused to each level. For each level and condition the problem is convex in b,
with b[k][t, 0] = 0.

``train.py`` stores the offsets in the exported scheduler of every conditional model; ``cdrl-calibrate``
adds them to a checkpoint exported before they existed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdrl.config import LangevinConfig
from cdrl.guidance import null_condition
from cdrl.sampling import frozen, level, linear_energy_fn
from cdrl.schedule import NoiseSchedule
from cdrl.utils import expand_as

__all__ = ["calibrate_on_dataset", "fit_condition_offsets"]


def fit_condition_offsets(
    ebm: nn.Module,
    schedule: NoiseSchedule,
    settings: LangevinConfig,
    x0: Tensor,
    cond: Tensor,
    condition_sizes: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
) -> list[Tensor]:
    """The implicit classifier's offsets per condition and level, by maximum likelihood on labelled data.

    Args:
        ebm: the (EMA) EBM.
        schedule: its noise schedule.
        settings: the sampling Langevin settings (their temperatures define the classifier's logits).
        x0: (n, ...) training data in model units (data times ``data.scale``).
        cond: (n, K) their labels, one column per condition (class first, then attributes).
        condition_sizes: values per condition; the null id of condition k is ``condition_sizes[k]``.
        generator: for the forward-diffusion noise.
        batch_size: examples per EBM forward.

    Returns:
        One (T, size_k) float32 tensor per condition, with column 0 equal to 0: energy offsets, fitted as
        logit offsets at ``settings``' temperatures and multiplied by them.
    """
    if cond.dim() != 2 or cond.shape[1] != len(condition_sizes):
        raise ValueError(
            f"cond must be (n, {len(condition_sizes)}) labels, got shape {tuple(cond.shape)}"
        )
    if len(x0) != len(cond) or len(x0) == 0:
        raise ValueError(
            f"got {len(x0)} examples and {len(cond)} labels; need as many, at least one"
        )
    device = next(ebm.parameters()).device
    x0, cond = x0.to(device), cond.to(device)
    null_row = null_condition(condition_sizes, 1, device)[0]
    offsets = [torch.zeros(schedule.num_levels, size) for size in condition_sizes]
    with frozen(ebm):
        for t in range(schedule.num_levels):
            t_all = torch.full((len(x0),), t, device=device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            lvl_all = level(schedule, t_all, settings)
            y = schedule.q_sample(x0, t_all, noise) * expand_as(lvl_all.scale, x0)
            temperature = float(lvl_all.temperature[0])
            for k, size in enumerate(condition_sizes):
                logits = _logits(ebm, schedule, settings, y, t, null_row, k, size, batch_size)
                offsets[k][t] = _fit(logits, cond[:, k].cpu()) * temperature
    return offsets


def _logits(
    ebm: nn.Module,
    schedule: NoiseSchedule,
    settings: LangevinConfig,
    y: Tensor,
    t: int,
    null_row: Tensor,
    k: int,
    size: int,
    batch_size: int,
) -> Tensor:
    """(n, size) float64 -E(y, t, c_k = v) / temperature, the other conditions null."""
    columns = []
    for value in range(size):
        parts = []
        for chunk in y.split(batch_size):
            lvl = level(schedule, torch.full((len(chunk),), t, device=chunk.device), settings)
            alternative = null_row.expand(len(chunk), -1).clone()
            alternative[:, k] = value
            with torch.no_grad():
                parts.append(-linear_energy_fn(ebm, lvl, null=alternative)(chunk))
        columns.append(torch.cat(parts).double().cpu())
    return torch.stack(columns, 1)


def _fit(logits: Tensor, labels: Tensor) -> Tensor:
    """Offsets b (b[0] = 0) maximizing sum_i log softmax(logits_i + b)[label_i]; (size,) float32."""
    size = logits.shape[1]
    free = torch.zeros(size - 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [free], lr=1.0, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        b = torch.cat([free.new_zeros(1), free])
        loss = F.cross_entropy(logits + b, labels.long())
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return torch.cat([free.new_zeros(1), free.detach()]).float()


def calibrate_on_dataset(
    pipeline,
    dataset: torch.utils.data.Dataset,
    data_scale: float,
    *,
    num_samples: int = 4096,
    seed: int = 0,
) -> int:
    """``pipeline.calibrate`` on (up to) ``num_samples`` random examples of a labelled data set, scaled to
    model units; the offsets land in the pipeline's scheduler config. Returns the number of examples used."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:num_samples].tolist()
    x0 = torch.stack([dataset[i][0] for i in index]) * data_scale
    cond = torch.stack([dataset[i][1] for i in index])
    device = next(pipeline.ebm.parameters()).device
    pipeline.calibrate(x0.to(device), cond.to(device), generator=generator)
    return len(index)
