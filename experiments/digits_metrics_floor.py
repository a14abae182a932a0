"""The floor of the digits FID / KID (real digits against real digits) and the IS of real digits.

Uses the offline digits extractor that ``cdrl-evaluate`` uses for 8x8 models (``cdrl/evaluation/fidelity.py``),
through torch-fidelity, with the same settings. Pairs of real sets: the two halves of the test split
(180 vs 180), the two halves of the train split (718 vs 719), each over several random halvings, and
the whole test split against the whole train split (360 vs 1437). FID is biased upwards at small
sample sizes, so read a model's digits FID against the real-vs-real figure at a similar size.

Usage: python experiments/digits_metrics_floor.py [--classifier PATH] [--repeats 5] [--output floor.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cdrl.evaluation.digits import digits_classifier_path, digits_split
from cdrl.evaluation.fidelity import DIGITS_EXTRACTOR, Reference, compute_fidelity
from cdrl.images import to_uint8
from cdrl.utils import git_sha

METRICS = {"fid", "kid", "isc"}


def measure(a: Tensor, b: Tensor, weights: Path) -> dict[str, float]:
    """FID and KID of ``a`` against ``b`` and the IS of ``a`` ((n, 1, 8, 8) uint8 each)."""
    figures, _ = compute_fidelity(
        a,
        Reference.from_images("b", b),
        metrics=METRICS,
        extractor=DIGITS_EXTRACTOR,
        weights_path=weights,
        batch_size=512,
        cache_root=None,
    )
    return figures


def halves(x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """A random split of ``x`` into two halves (the first gets the smaller half when n is odd)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[: len(x) // 2]], x[order[len(x) // 2 :]]


def floor(weights: Path, *, repeats: int = 5) -> list[dict[str, Any]]:
    """Every real-vs-real pair: its sizes, and the mean and std of each figure over the halvings."""
    x_train, _, x_test, _ = digits_split()
    train, test = to_uint8(x_train), to_uint8(x_test)
    pairs = {
        "test half vs test half": [halves(test, seed) for seed in range(repeats)],
        "train half vs train half": [halves(train, seed) for seed in range(repeats)],
        "test vs train": [(test, train)],
    }
    rows = []
    for name, splits in pairs.items():
        runs = [measure(a, b, weights) for a, b in splits]
        row: dict[str, Any] = {"pair": name, "n1": len(splits[0][0]), "n2": len(splits[0][1])}
        row["repeats"] = len(runs)
        for key in runs[0]:
            values = np.array([run[key] for run in runs])
            row[key] = float(values.mean())
            row[f"{key}_spread"] = float(values.std())  # over halvings (0 for a single pair)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="digits classifier folder (default $CDRL_CACHE_DIR/digits_classifier, trained if missing)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="random halvings per split")
    parser.add_argument("--output", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    weights = digits_classifier_path(args.classifier)
    rows = floor(weights, repeats=args.repeats)
    print(f"{'pair':<26} {'n1':>5} {'n2':>5}  {'FID':>15}  {'KID':>15}  {'IS (of set 1)':>15}")
    for row in rows:
        cells = [
            f"{row[k]:7.3f} ± {row[f'{k}_spread']:5.3f}" for k in ("fid", "kid_mean", "isc_mean")
        ]
        print(f"{row['pair']:<26} {row['n1']:>5} {row['n2']:>5}  " + "  ".join(cells))
    print(
        f"(± is the spread over {args.repeats} random halvings; {time.perf_counter() - start:.0f} s)"
    )
    if args.output is not None:
        info = {"classifier": str(weights), "git": git_sha(), "rows": rows}
        args.output.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
