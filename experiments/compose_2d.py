"""Compose the x-band and y-band conditions of a 2-D toy model: AND of two bands, NOT of a band.

The model must be trained with data.attributes [xband, yband] (configs/toy2d_compose.yaml). With
E_k = E(x | condition k) and E_0 the null energy, the composed energy is
E_0 + sum_k w_k (E_k - E_0):
  AND      (xband=a, w_and) and (yband=b, w_and)        -> fraction in {xband=a, yband=b}
  NOT      (xband=a, w_not), w_not < 0                  -> fraction outside {xband=a}
  AND NOT  (yband=b, w_and) and (xband=a, w_not)        -> fraction in {yband=b, xband!=a}
With --negation posterior (the default) a negated term adds |w_not| (-log p(xband != a | y)) to the energy
instead, p being the EBM's calibrated implicit classifier: a bounded NOT that keeps samples on the data.
With --negation linear it is the formula above. Each passes at >= 90%. Bands split at
cdrl.data.BAND_SPLITS[name].

Usage: python experiments/compose_2d.py --checkpoint DIR [--num_samples 2000] --output_dir DIR
       [--xband 0] [--yband 0] [--and_weight 2.0] [--negation posterior|linear] [--not_weight W]
       [--seed 0]
Writes compose_2d.json and compose_2d.png into --output_dir.
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
from diffusers.utils import logging as diffusers_logging

from cdrl.data import BAND_SPLITS, attribute_values
from cdrl.export import load_pipeline, resolve_checkpoint
from cdrl.toys import TOY_NAMES, sample_toy, toy_modes
from cdrl.utils import git_sha

MIN_FRACTION = 0.90  # pass: at least this fraction of samples in the target region
EXPERIMENTS = ("and", "not", "and_not")
DEFAULT_NOT_WEIGHT = {"posterior": -3.0, "linear": -1.0}  # see experiments/results/compose.md


def region_mask(
    name: str,
    points: np.ndarray | torch.Tensor,
    *,
    xband: int | None = None,
    yband: int | None = None,
    not_xband: int | None = None,
) -> np.ndarray:
    """Which points lie in a region of the x and y bands.

    Args:
        name: the toy data set (its band split is ``BAND_SPLITS[name]``).
        points: (n, 2) points in data units.
        xband, yband: keep points whose band has this value (None: any).
        not_xband: keep points whose x band is not this value (None: any).

    Returns:
        (n,) bool.
    """
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inside = np.ones(len(points), dtype=bool)
    x_values = attribute_values(name, points, "xband")
    if xband is not None:
        inside &= x_values == xband
    if not_xband is not None:
        inside &= x_values != not_xband
    if yband is not None:
        inside &= attribute_values(name, points, "yband") == yband
    return inside


def target(experiment: str, *, xband: int, yband: int) -> tuple[dict[str, int], str]:
    """An experiment's target region, as ``region_mask`` keyword arguments and in words."""
    targets = {
        "and": ({"xband": xband, "yband": yband}, f"xband={xband} AND yband={yband}"),
        "not": ({"not_xband": xband}, f"NOT xband={xband}"),
        "and_not": ({"yband": yband, "not_xband": xband}, f"yband={yband} AND NOT xband={xband}"),
    }
    if experiment not in targets:
        raise ValueError(f"unknown experiment {experiment!r}; choose one of {EXPERIMENTS}")
    return targets[experiment]


def evaluate(
    name: str,
    points: np.ndarray | torch.Tensor,
    experiment: str,
    *,
    xband: int,
    yband: int,
    min_fraction: float = MIN_FRACTION,
) -> dict[str, Any]:
    """The fraction of samples in an experiment's target region, and whether it passes.

    Args:
        name: the toy data set.
        points: (n, 2) samples in data units.
        experiment: "and" (target xband == a and yband == b), "not" (target xband != a) or
            "and_not" (target yband == b and xband != a).
        xband, yband: a and b.
        min_fraction: the fraction that passes.

    Returns:
        JSON-ready dict: experiment, target (in words), num_points, fraction, in_support (the
        fraction on the data's support, for information), min_fraction, passes.
    """
    constraint, words = target(experiment, xband=xband, yband=yband)
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inside = region_mask(name, points, **constraint)
    fraction = float(inside.mean()) if len(inside) else 0.0
    in_support = toy_modes(name, points)[0]
    return {
        "experiment": experiment,
        "target": words,
        "num_points": int(len(inside)),
        "fraction": fraction,
        "in_support": float(in_support.mean()) if len(in_support) else 0.0,
        "min_fraction": min_fraction,
        "passes": bool(len(inside) > 0 and fraction >= min_fraction),
    }


def compose_terms(
    attributes: list[str],
    experiment: str,
    *,
    xband: int,
    yband: int,
    and_weight: float,
    not_weight: float,
) -> list[tuple[list[int | None], float]]:
    """The pipeline's ``compose`` argument of an experiment (conditions in ``attributes`` order)."""

    def labels(attribute: str, value: int) -> list[int | None]:
        out: list[int | None] = [None] * len(attributes)
        out[attributes.index(attribute)] = value
        return out

    if experiment == "and":
        return [(labels("xband", xband), and_weight), (labels("yband", yband), and_weight)]
    if experiment == "not":
        return [(labels("xband", xband), not_weight)]
    if experiment == "and_not":
        return [(labels("yband", yband), and_weight), (labels("xband", xband), not_weight)]
    raise ValueError(f"unknown experiment {experiment!r}; choose one of {EXPERIMENTS}")


def training_data(folder: Path) -> tuple[str, list[str]]:
    """A checkpoint's toy data set and attribute order, from its ``training_config.yaml``."""
    path = folder / "training_config.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; --checkpoint must be an exported pipeline")
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    name, attributes = data.get("name"), list(data.get("attributes") or [])
    if name not in TOY_NAMES:
        raise SystemExit(
            f"error: {path} has data.name={name!r}, not a 2-D toy ({', '.join(TOY_NAMES)})"
        )
    if not data.get("class_conditional") or sorted(attributes) != ["xband", "yband"]:
        raise SystemExit(
            f"error: {path} is not conditioned on [xband, yband] (class_conditional="
            f"{data.get('class_conditional')}, attributes={attributes}); train with "
            "configs/toy2d_compose.yaml"
        )
    return name, attributes


def save_figure(
    name: str,
    samples: dict[str, np.ndarray],
    results: dict[str, dict[str, Any]],
    path: Path,
    *,
    xband: int,
    yband: int,
) -> None:
    """One scatter panel per experiment: data grey, samples in the target blue, the others red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = sample_toy(name, 2000, 12345)
    split = BAND_SPLITS[name]
    fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 4.4), squeeze=False)
    for ax, (experiment, points) in zip(axes[0], samples.items(), strict=True):
        constraint, words = target(experiment, xband=xband, yband=yband)
        inside = region_mask(name, points, **constraint)
        points = np.clip(points, -1.35, 1.35)  # show far-off samples on the border
        ax.scatter(real[:, 0], real[:, 1], s=1, c="0.8")
        ax.scatter(*points[inside].T, s=2, c="tab:blue", label="in target")
        ax.scatter(*points[~inside].T, s=2, c="tab:red", label="outside")
        ax.axvline(split, c="k", lw=0.5, ls="--")
        ax.axhline(split, c="k", lw=0.5, ls="--")
        ax.set(xlim=(-1.4, 1.4), ylim=(-1.4, 1.4), aspect="equal")
        ax.set_title(f"{words}: {results[experiment]['fraction']:.1%}", fontsize=9)
    axes[0][0].legend(loc="lower left", markerscale=4, fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="exported pipeline (or run) folder")
    parser.add_argument("--num_samples", type=int, default=2000, help="samples per experiment")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--xband", type=int, choices=(0, 1), default=0, help="a: the x band used")
    parser.add_argument("--yband", type=int, choices=(0, 1), default=0, help="b: the y band used")
    parser.add_argument("--and_weight", type=float, default=2.0, help="weight of each AND term")
    parser.add_argument(
        "--not_weight",
        type=float,
        default=None,
        help="weight of the negated term (< 0; default -3 with posterior negation, -1 with linear)",
    )
    parser.add_argument(
        "--negation",
        choices=("linear", "posterior"),
        default="posterior",
        help="how the negative weight acts (CDRLPipeline's negation argument; posterior needs the "
        "checkpoint's calibrated offsets, which train.py stores and cdrl-calibrate adds)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num_samples must be positive")
    if args.not_weight is None:
        args.not_weight = DEFAULT_NOT_WEIGHT[args.negation]
    if args.not_weight >= 0:
        parser.error("--not_weight must be negative (NOT)")

    diffusers_logging.disable_progress_bar()
    try:
        folder = resolve_checkpoint(args.checkpoint)
        name, attributes = training_data(folder)
        pipeline = load_pipeline(folder, args.device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    pipeline.set_progress_bar_config(disable=True)
    if args.negation == "posterior" and pipeline.scheduler.config.get("condition_offsets") is None:
        raise SystemExit(
            f"error: {folder} has no calibrated condition offsets, which --negation posterior needs; run "
            f"`cdrl-calibrate --checkpoint {folder}` first, or pass --negation linear"
        )

    # Sample each experiment's composition from its own seed.
    results, samples = {}, {}
    for index, experiment in enumerate(EXPERIMENTS):
        terms = compose_terms(
            attributes,
            experiment,
            xband=args.xband,
            yband=args.yband,
            and_weight=args.and_weight,
            not_weight=args.not_weight,
        )
        out = pipeline(
            batch_size=args.num_samples,
            compose=terms,
            negation=args.negation,
            generator=torch.Generator().manual_seed(args.seed + index),
            output_type="np",
        )
        points = np.asarray(out.images, dtype=np.float64).reshape(args.num_samples, 2)
        results[experiment] = evaluate(name, points, experiment, xband=args.xband, yband=args.yband)
        results[experiment]["compose"] = [[labels, weight] for labels, weight in terms]
        samples[experiment] = points
        print(
            f"{results[experiment]['target']:<28} {results[experiment]['fraction']:.3f} "
            f"(need >= {MIN_FRACTION}); on the data support {results[experiment]['in_support']:.3f}"
        )
    passes = all(result["passes"] for result in results.values())
    print("PASS" if passes else "FAIL")

    summary = {
        "checkpoint": str(folder),
        "data": name,
        "attributes": attributes,
        "band_split": BAND_SPLITS[name],
        "num_samples": args.num_samples,
        "seed": args.seed,
        "negation": args.negation,
        "not_weight": args.not_weight,
        "git_sha": git_sha(),
        "experiments": results,
        "passes": passes,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "compose_2d.json").write_text(json.dumps(summary, indent=2) + "\n")
    figure = args.output_dir / "compose_2d.png"
    save_figure(name, samples, results, figure, xband=args.xband, yband=args.yband)
    return 0 if passes else 1


if __name__ == "__main__":
    sys.exit(main())
