"""Persistent Langevin chains for the lowest levels' EBM negatives (persistent contrastive divergence).

Why: a short-run chain that starts at the initializer's proposal only ever sees states a few steps from a
(slightly blurred) posterior mean, so the EBM learns "blur is unlikely" and nothing about where its
chains go when run longer. At the lowest level the tempering (1 / s_0^2 = 4e4) turns any such untrained
direction into a drift that long chains follow without bound (experiments/results/long_run.md), and the
level's normalizer explodes (experiments/results/evaluation.md). Persistent chains (Tieleman, ICML 2008)
keep some negatives running across training steps: they walk into those directions while the EBM is
training, and the recovery-likelihood gradient pushes the energy up there.

Each persistent level keeps ``size`` chains, shared evenly among the values of the condition labels (the
null label is a value of its own), each a state y with the x_{t+1} that tethers it. At every training step a ``fraction`` of
the batch's examples at persistent levels take their negative from a chain of the same level and labels
instead of from their own fresh chain: the chain runs the training's K steps more and is written back. A
chain is restarted from the example's fresh negative (its state and x_{t+1}) when its slot is empty or
with probability ``reset``. The positive and the negative then hold different x_{t+1}: both are draws for
the level, which is what the loss's expectation needs. They always hold the same labels: the loss is blind
to an energy offset per label only while every label enters it as often on both sides (with mixed labels
such offsets random-walk until the run diverges). The initializer keeps learning from the fresh chains
only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# (y, x_next, t, cond or None) -> y after K more Langevin steps of level t's recovery conditional
ChainRunner = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


class PersistentChains:
    """Buffers of Langevin chains per (level, condition labels): state y, tether x_{t+1}, a filled flag.

    ``size`` chains per level are split evenly among the label values: ceil(size / prod(size_k + 1)) per
    value, at least one. A buffer is allocated when its level and labels first occur.
    """

    def __init__(
        self,
        levels: int,
        size: int,
        *,
        fraction: float,
        reset: float,
        condition_sizes: tuple[int, ...] = (),
    ) -> None:
        if levels < 0 or size < 1 or not 0.0 <= fraction <= 1.0 or not 0.0 <= reset <= 1.0:
            raise ValueError(
                "persistent chains need levels >= 0, size >= 1 and fraction, reset in [0, 1]; got "
                f"{levels}, {size}, {fraction}, {reset}"
            )
        self.levels, self.fraction, self.reset = levels, fraction, reset
        self.condition_sizes = tuple(condition_sizes)
        self.per_key = max(1, math.ceil(size / math.prod(s + 1 for s in self.condition_sizes)))
        # (level, label key) -> {"y", "x_next", "filled"}
        self.buffers: dict[tuple[int, int], dict[str, Tensor]] = {}

    def _keys(self, cond: Tensor | None, n: int, device: torch.device) -> Tensor:
        """One integer per example for its labels (mixed radix; each condition has size + 1 values)."""
        keys = torch.zeros(n, dtype=torch.long, device=device)
        if cond is None:
            return keys
        for k, size in enumerate(self.condition_sizes):
            keys = keys * (size + 1) + cond[:, k].long()
        return keys

    def _buffer(self, lv: int, key: int, like: Tensor) -> dict[str, Tensor]:
        if (lv, key) not in self.buffers:
            y = torch.zeros(
                (self.per_key, *like.shape[1:]), dtype=torch.float32, device=like.device
            )
            self.buffers[(lv, key)] = {
                "y": y,
                "x_next": torch.zeros_like(y),
                "filled": torch.zeros(self.per_key, dtype=torch.bool, device=like.device),
            }
        return self.buffers[(lv, key)]

    @torch.no_grad()
    def negatives(
        self,
        t: Tensor,
        y_fresh: Tensor,
        x_next: Tensor,
        cond: Tensor | None,
        run: ChainRunner,
    ) -> tuple[Tensor, Tensor]:
        """The EBM's negatives with a share taken from (and written back to) the persistent chains.

        Args:
            t: (b,) levels of the batch.
            y_fresh: (b, ...) the fresh chains' refined negatives.
            x_next: (b, ...) the batch's x_{t+1}.
            cond: (b, K) the batch's labels after label dropout, or None.
            run: continues chains for K steps under the given labels (see ``ChainRunner``).

        Returns:
            (negatives (b, ...) to pair with the batch's labels, (b,) bool: which came from a continued chain).
        """
        y_neg = y_fresh.detach().clone()
        continued = torch.zeros_like(t, dtype=torch.bool)
        if self.levels == 0 or self.fraction == 0.0:
            return y_neg, continued
        chosen = (t < self.levels) & (torch.rand(t.shape, device=t.device) < self.fraction)
        keys = self._keys(cond, t.shape[0], t.device)
        groups = []  # (buffer, example indices, slots, restart mask)
        for lv, key in torch.unique(torch.stack([t[chosen], keys[chosen]], 1), dim=0).tolist():
            idx = torch.nonzero(chosen & (t == lv) & (keys == key)).squeeze(1)[: self.per_key]
            slot = torch.randperm(self.per_key, device=t.device)[: idx.numel()]  # distinct slots
            buf = self._buffer(lv, key, y_fresh)
            restart = ~buf["filled"][slot] | (torch.rand(idx.shape, device=t.device) < self.reset)
            groups.append((buf, idx, slot, restart))
        # Continue every kept chain in one batch, under its own tether and the (shared) labels.
        kept = [(buf, idx[~r], slot[~r]) for buf, idx, slot, r in groups if (~r).any()]
        if kept:
            k_idx = torch.cat([idx for _, idx, _ in kept])
            y0 = torch.cat([buf["y"][slot] for buf, _, slot in kept])
            tether = torch.cat([buf["x_next"][slot] for buf, _, slot in kept])
            k_cond = None if cond is None else cond[k_idx]
            y_neg[k_idx] = run(y0, tether, t[k_idx], k_cond).to(y_neg)
            continued[k_idx] = True
        for buf, idx, slot, restart in groups:  # restarted chains take the example's tether
            buf["x_next"][slot[restart]] = x_next[idx[restart]].float()
            buf["y"][slot] = y_neg[idx].float()
            buf["filled"][slot] = True
        return y_neg, continued

    def state_dict(self) -> dict[str, Tensor]:
        """The buffers as tensors named ``{level}.{label key}.{y|x_next|filled}``."""
        return {
            f"{lv}.{key}.{name}": value.contiguous()
            for (lv, key), buf in sorted(self.buffers.items())
            for name, value in buf.items()
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore buffers saved by ``state_dict``; they must match this run's levels and size."""
        buffers: dict[tuple[int, int], dict[str, Tensor]] = {}
        for name, value in state.items():
            lv, key, field = name.split(".")
            buffers.setdefault((int(lv), int(key)), {})[field] = value
        for (lv, _), buf in buffers.items():
            if lv >= self.levels or buf["filled"].shape[0] != self.per_key:
                raise ValueError(
                    f"the stored persistent chains (level {lv}, {buf['filled'].shape[0]} chains) do not "
                    f"fit this config ({self.levels} levels, {self.per_key} chains per label value); resume with the "
                    "run's config.yaml"
                )
            buf["y"], buf["x_next"], buf["filled"] = (
                buf["y"].float(),
                buf["x_next"].float(),
                buf["filled"].bool(),
            )
        self.buffers = buffers

    def to(self, device: torch.device | str) -> PersistentChains:
        for buf in self.buffers.values():
            for name in buf:
                buf[name] = buf[name].to(device)
        return self
