"""Score a trained 2-D toy model: fraction of samples in the support and per-mode shares.

Usage: python experiments/toy2d_check.py --checkpoint DIR [--num_samples 2000] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cdrl.toys import TOY_NAMES, sample_toy, toy_modes

MIN_IN_SUPPORT = 0.90  # pass: at least this fraction of samples in the support
RATIO_RANGE = (0.5, 1.5)  # pass: every mode's share / expected share inside this range


def evaluate_points(name: str, points: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Support and mode-coverage scores of samples from a toy model.

    Shares are taken over the in-support points only (an off-support point belongs to no mode);
    with no point in the support every share is 0.

    Args:
        name: one of ``TOY_NAMES``.
        points: (n, 2) samples in data units.

    Returns:
        JSON-ready dict: name, num_points, in_support (fraction), share, expected_share,
        ratio (share / expected share, per mode), min_ratio, max_ratio, passed and the thresholds.
    """
    in_support, mode, expected = toy_modes(name, points)
    counts = np.bincount(mode[in_support], minlength=len(expected)).astype(np.float64)
    share = counts / max(int(in_support.sum()), 1)
    ratio = share / expected
    fraction = float(in_support.mean()) if len(in_support) else 0.0
    passed = (
        fraction >= MIN_IN_SUPPORT
        and float(ratio.min()) >= RATIO_RANGE[0]
        and float(ratio.max()) <= RATIO_RANGE[1]
    )
    return {
        "name": name,
        "num_points": int(len(in_support)),
        "in_support": fraction,
        "share": share.tolist(),
        "expected_share": expected.tolist(),
        "ratio": ratio.tolist(),
        "min_ratio": float(ratio.min()),
        "max_ratio": float(ratio.max()),
        "passed": bool(passed),
        "thresholds": {"min_in_support": MIN_IN_SUPPORT, "ratio_range": list(RATIO_RANGE)},
    }


def dataset_name(checkpoint: Path) -> str:
    """The data set a checkpoint was trained on, from ``DIR/training_config.yaml``."""
    path = checkpoint / "training_config.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; --checkpoint must be a saved pipeline folder")
    config = yaml.safe_load(path.read_text()) or {}
    name = (config.get("data") or {}).get("name")
    if name not in TOY_NAMES:
        raise SystemExit(
            f"error: {path} has data.name={name!r}, not a 2-D toy ({', '.join(TOY_NAMES)})"
        )
    return name


def sample_points(
    checkpoint: Path, num_samples: int, seed: int, num_langevin_steps: int | None = None
) -> np.ndarray:
    """(num_samples, 2) samples of the saved pipeline, in data units (K per level: the stored one
    unless ``num_langevin_steps`` is given)."""
    from cdrl import CDRLPipeline

    pipe = CDRLPipeline.from_pretrained(str(checkpoint))
    out = pipe(
        batch_size=num_samples,
        generator=torch.Generator().manual_seed(seed),
        num_langevin_steps=num_langevin_steps,
        output_type="pt",
    )
    points = out.images
    if isinstance(points, torch.Tensor):
        points = points.detach().float().cpu().numpy()
    return np.asarray(points, dtype=np.float64).reshape(num_samples, 2)


def save_plot(name: str, points: np.ndarray, path: Path, seed: int) -> None:
    """Scatter plot of the samples (red) over real data (grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = sample_toy(name, max(len(points), 2000), seed + 12345)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(real[:, 0], real[:, 1], s=1, c="0.7", label="data")
    ax.scatter(points[:, 0], points[:, 1], s=1, c="tab:red", label="samples")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.set_title(name)
    ax.legend(loc="upper right", markerscale=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="saved pipeline folder")
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_langevin_steps", type=int, default=None, help="K per level (default: the stored one)"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the scores as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="save a scatter plot PNG here")
    args = parser.parse_args(argv)

    name = dataset_name(args.checkpoint)
    points = sample_points(args.checkpoint, args.num_samples, args.seed, args.num_langevin_steps)
    result = {
        "checkpoint": str(args.checkpoint),
        "seed": args.seed,
        "num_langevin_steps": args.num_langevin_steps,
        **evaluate_points(name, points),
    }
    print(f"{name}: {result['in_support']:.3f} in support (need >= {MIN_IN_SUPPORT})")
    for index, (share, ratio) in enumerate(zip(result["share"], result["ratio"], strict=True)):
        print(f"  mode {index}: share {share:.3f}  ratio {ratio:.2f}")
    low, high = RATIO_RANGE
    print(
        f"ratio min {result['min_ratio']:.2f} max {result['max_ratio']:.2f} (need [{low}, {high}])"
    )
    print("PASS" if result["passed"] else "FAIL")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    if args.plot is not None:
        save_plot(name, points, args.plot, args.seed)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
