"""``train.py`` on uniformly dequantized digits (issue 17): the lowest level learns the density the bound scores.

The package trains on the 17 grey levels mapped to k / 16 * 2 - 1, a 17-point grid in [-1, 1]; its level 0
(abar_0 = 0.99995, noise std 0.0074) then learns to snap onto that grid, while ``cdrl.evaluation.bpd.bits_per_dim``
scores dequantized digits x' = (k + u) / 17 * 2 - 1, u ~ U[0, 1), which lie anywhere in their bin (width
2 / 17 = 0.118). This wrapper runs ``cdrl.cli.train.main`` unchanged except that the training set's
``__getitem__`` returns a fresh dequantization of each digit on every access (the same map as
``cdrl.evaluation.bpd.dequantize`` with num_bins = 17). Only images with 17 levels are supported.

Usage: the same flags as train.py, e.g.
  python experiments/train_dequantized.py --config digits --output_dir /work/runs/d17_deq --report_to none
"""

from __future__ import annotations

import sys

import torch

import cdrl.cli.train as train_cli
import cdrl.training.loop as loop_module

NUM_BINS = 17
_load_dataset = loop_module.load_dataset


class Dequantized(torch.utils.data.Dataset):
    """Wraps a (x in [-1, 1], cond) data set of 17-level images: x -> (k + u) / 17 * 2 - 1 on each access."""

    def __init__(self, base) -> None:
        self.base = base
        for name in ("condition_sizes", "sample_shape", "is_image"):
            setattr(self, name, getattr(base, name))

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int):
        x, cond = self.base[index]
        k = torch.round((x.clamp(-1, 1) + 1) / 2 * (NUM_BINS - 1))
        return (k + torch.rand(x.shape)) / NUM_BINS * 2 - 1, cond


def load_dequantized(cfg, split: str = "train"):
    dataset = _load_dataset(cfg, split=split)
    if cfg.name != "digits":
        raise SystemExit("train_dequantized.py supports data.name=digits only (17 grey levels)")
    return Dequantized(dataset)


if __name__ == "__main__":
    loop_module.load_dataset = load_dequantized
    sys.exit(train_cli.main())
