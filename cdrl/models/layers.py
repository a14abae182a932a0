"""Blocks both networks use: the sinusoidal noise-level embedding and the condition (label) embedding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cdrl.guidance import null_condition


def noise_level_embedding(noise_level: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the continuous noise level u' in [0, 1], scaled by 1000 (DDPM, CDRL code).

    Args:
        noise_level: (b,) float.
        dim: embedding width.

    Returns:
        (b, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=noise_level.device) / max(half - 1, 1)
    )
    args = 1000.0 * noise_level.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


class ConditionEmbedding(nn.Module):
    """Sum of one embedding per condition; condition k has sizes[k] values plus a null token (id sizes[k]).

    The class label is condition 0 (its null id is ``num_classes``, as in CDRL's conditional model); further
    conditions are attributes used for composition.
    """

    def __init__(self, sizes: tuple[int, ...] | list[int], dim: int) -> None:
        super().__init__()
        self.sizes = tuple(int(n) for n in sizes)
        self.tables = nn.ModuleList([nn.Embedding(n + 1, dim) for n in self.sizes])

    def null(self, batch: int, device: torch.device) -> Tensor:
        """(b, K) long, every condition set to its null token."""
        return null_condition(self.sizes, batch, device)

    def forward(self, cond: Tensor) -> Tensor:
        """cond: (b, K) long (or (b,) for a single condition) -> (b, dim)."""
        if cond.dim() == 1:
            cond = cond[:, None]
        if cond.shape[1] != len(self.sizes):
            raise ValueError(f"expected {len(self.sizes)} condition columns, got {cond.shape[1]}")
        return sum(table(cond[:, k]) for k, table in enumerate(self.tables))
