"""Compose the class and the thickness of digits: class AND thick, class AND thin, class AND NOT thick.

The model must be trained with data.attributes [thickness] on class-conditional digits
(configs/digits_compose.yaml). Conditions are (class, thickness); thickness is 1 (thick) when a digit's
ink mass is above the training median (``cdrl.data.attribute_values``). For each class c:
  class        (c, null) at weight 1                           -> the class's own thick share
  thick        (c, null) and (null, thick), each at and_weight -> fraction thick, fraction of class c
  thin         (c, null) and (null, thin), each at and_weight
  not_thick    (c, null) at and_weight and (null, thick) at not_weight (< 0): NOT thick
The class is judged by the independent digits classifier (argmax), thickness by ink mass.

Usage: python experiments/compose_digits.py --checkpoint DIR --output_dir DIR [--per_class 100]
       [--and_weight 2] [--not_weight -1] [--negation linear|posterior] [--seed 0]
Writes compose_digits.json, compose_digits.md and compose_digits.png (per class: thick | thin |
not thick samples) into --output_dir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging
from torch import Tensor

from cdrl.data import attribute_values
from cdrl.evaluation.digits import load_digits_classifier, predict_probabilities
from cdrl.export import load_pipeline
from cdrl.images import save_grid
from cdrl.utils import git_sha

EXPERIMENTS = ("class", "thick", "thin", "not_thick")
FIGURE_PER_CELL = 6  # samples per class shown for each of thick, thin, not thick


def compose_terms(
    experiment: str, label: int, *, and_weight: float, not_weight: float
) -> list[tuple[tuple[int | None, int | None], float]]:
    """The pipeline's ``compose`` terms of one experiment for class ``label``."""
    if experiment == "class":
        return [((label, None), 1.0)]
    if experiment == "thick":
        return [((label, None), and_weight), ((None, 1), and_weight)]
    if experiment == "thin":
        return [((label, None), and_weight), ((None, 0), and_weight)]
    if experiment == "not_thick":
        return [((label, None), and_weight), ((None, 1), not_weight)]
    raise ValueError(f"unknown experiment {experiment!r}")


def run(
    pipeline,
    classifier,
    *,
    per_class: int,
    and_weight: float,
    not_weight: float,
    seed: int,
    negation: str = "linear",
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Sample every (experiment, class) cell; returns per-cell and mean scores, and the samples."""
    cells: list[dict[str, Any]] = []
    samples: dict[str, list[Tensor]] = {name: [] for name in EXPERIMENTS}
    for index, experiment in enumerate(EXPERIMENTS):
        for label in range(10):
            terms = compose_terms(experiment, label, and_weight=and_weight, not_weight=not_weight)
            generator = torch.Generator().manual_seed(seed + 100 * index + label)
            out = pipeline(
                batch_size=per_class,
                compose=terms,
                negation=negation,
                generator=generator,
                output_type="pt",
            )
            images = torch.as_tensor(out.images).float().cpu() * 2 - 1
            predicted = predict_probabilities(classifier, images).argmax(1)
            thick = torch.from_numpy(attribute_values("digits", images, "thickness")).bool()
            is_class = predicted == label
            cell = {
                "experiment": experiment,
                "class": label,
                "class_rate": float(is_class.float().mean()),
                "thick_rate": float(thick.float().mean()),
                "class_and_thick": float((is_class & thick).float().mean()),
                "class_and_thin": float((is_class & ~thick).float().mean()),
            }
            cells.append(cell)
            samples[experiment].append(images)
    summary = {}
    for experiment in EXPERIMENTS:
        rows = [cell for cell in cells if cell["experiment"] == experiment]
        summary[experiment] = {
            key: sum(row[key] for row in rows) / len(rows)
            for key in ("class_rate", "thick_rate", "class_and_thick", "class_and_thin")
        }
    return {"cells": cells, "mean": summary}, {k: torch.stack(v) for k, v in samples.items()}


def markdown_table(result: dict[str, Any]) -> str:
    """Mean over the 10 classes of each experiment's rates."""
    lines = [
        "| experiment | compose terms (per class c) | class c | thick | class c and thick | "
        "class c and thin |",
        "|---|---|---|---|---|---|",
    ]
    described = {
        "class": "(c) weight 1",
        "thick": f"(c) AND thick, weights {result['and_weight']:g}",
        "thin": f"(c) AND thin, weights {result['and_weight']:g}",
        "not_thick": f"(c) {result['and_weight']:g}, NOT thick {result['not_weight']:g}"
        + (" (posterior)" if result.get("negation") == "posterior" else ""),
    }
    for experiment in EXPERIMENTS:
        row = result["mean"][experiment]
        lines.append(
            f"| {experiment} | {described[experiment]} | {row['class_rate']:.3f} | "
            f"{row['thick_rate']:.3f} | {row['class_and_thick']:.3f} | {row['class_and_thin']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def save_figure(samples: dict[str, Tensor], path: Path) -> None:
    """Rows = classes 0..9; columns: thick samples | thin samples | NOT-thick samples."""
    k = FIGURE_PER_CELL
    blank = -torch.ones(1, 1, 8, 8)
    rows = []
    for label in range(10):
        row = []
        for experiment in ("thick", "thin", "not_thick"):
            row += [samples[experiment][label][:k], blank]
        rows.append(torch.cat(row[:-1]))
    save_grid(torch.cat(rows), path, nrow=3 * k + 2, upscale=4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="exported pipeline (or run) folder")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument(
        "--per_class", type=int, default=100, help="samples per class and experiment"
    )
    parser.add_argument("--and_weight", type=float, default=2.0, help="weight of each AND term")
    parser.add_argument(
        "--not_weight", type=float, default=-1.0, help="weight of the negated term (< 0)"
    )
    parser.add_argument(
        "--negation",
        choices=("linear", "posterior"),
        default="linear",
        help="how the negative weight acts (CDRLPipeline's negation argument; posterior needs the "
        "checkpoint's calibrated offsets: cdrl-calibrate)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier", type=Path, default=None, help="digits classifier folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.per_class < FIGURE_PER_CELL:
        parser.error(f"--per_class must be at least {FIGURE_PER_CELL}")
    if args.not_weight >= 0:
        parser.error("--not_weight must be negative (it expresses NOT)")

    diffusers_logging.disable_progress_bar()
    try:
        pipeline = load_pipeline(args.checkpoint, args.device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    pipeline.set_progress_bar_config(disable=True)
    if tuple(pipeline.condition_sizes) != (10, 2) or tuple(pipeline.sample_shape) != (1, 8, 8):
        raise SystemExit(
            f"error: {args.checkpoint} is not a digits model with conditions (class, thickness); "
            "train one with configs/digits_compose.yaml"
        )
    if args.negation == "posterior" and pipeline.scheduler.config.get("condition_offsets") is None:
        raise SystemExit(
            f"error: {args.checkpoint} has no calibrated condition offsets, which --negation posterior "
            f"needs; run `cdrl-calibrate --checkpoint {args.checkpoint}` first"
        )
    classifier = load_digits_classifier(args.classifier)
    start = time.perf_counter()
    result, samples = run(
        pipeline,
        classifier,
        per_class=args.per_class,
        and_weight=args.and_weight,
        not_weight=args.not_weight,
        seed=args.seed,
        negation=args.negation,
    )
    result = {
        "checkpoint": str(args.checkpoint),
        "per_class": args.per_class,
        "and_weight": args.and_weight,
        "not_weight": args.not_weight,
        "negation": args.negation,
        "seed": args.seed,
        "seconds": time.perf_counter() - start,
        "git_sha": git_sha(),
        **result,
    }
    table = markdown_table(result)
    print(table, end="")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "compose_digits.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output_dir / "compose_digits.md").write_text(table)
    save_figure(samples, args.output_dir / "compose_digits.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
