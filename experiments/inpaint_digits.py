"""Inpaint halves of real 8x8 test digits and check that the completions keep the digit's class.

For each of the left, right, top and bottom halves masked (mask 1 / white = repaint, 0 / black =
keep), the model completes ``--num_images`` test digits; an independent classifier (trained on real
digits only) judges whether each completion is still the original digit. The baseline fills the hole
with the mean training image. The known half must come back exactly.

Usage: python experiments/inpaint_digits.py --checkpoint DIR [--num_images 200] [--seed 0]
       --output_dir DIR [--batch_size 500] [--classifier PATH] [--device cuda]
Writes inpaint_digits.json, inpaint_digits.md and inpaint_digits.png into --output_dir.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from torch import Tensor

from cdrl.evaluation.digits import (
    digits_split,
    load_digits_classifier,
    predict_probabilities,
)
from cdrl.export import load_pipeline
from cdrl.generation import complete, preset_mask
from cdrl.images import save_grid
from cdrl.utils import git_sha

HALVES = ("left_half", "right_half", "top_half", "bottom_half")
MIN_Z = 2.0  # 'clearly more often': the paired z-score over images must reach this
KNOWN_TOLERANCE = 1e-6  # digits are multiples of 1/16, so the kept half must come back bit-exact
FIGURE_COLUMNS = 10


def fill_with_mean(images: Tensor, repaint: Tensor, mean: Tensor) -> Tensor:
    """The baseline completion: the hole filled with the mean training image.

    Args:
        images: (n, 1, h, w) in [-1, 1].
        repaint: (n or 1, 1, h, w) masks, 1 = repaint.
        mean: (1, h, w) mean training image in [-1, 1].

    Returns:
        (n, 1, h, w) in [-1, 1].
    """
    return repaint * mean + (1 - repaint) * images


def known_pixel_error(completions: Tensor, images: Tensor, repaint: Tensor) -> float:
    """The largest change of a kept pixel (0.0 when every kept pixel is preserved exactly).

    Args:
        completions: (n, 1, h, w).
        images: (n, 1, h, w) the originals, same units.
        repaint: (n or 1, 1, h, w) masks, 1 = repaint.
    """
    keep = (1 - repaint).expand_as(images).bool()
    if not keep.any():
        return 0.0
    return float((completions - images).abs()[keep].max())


def class_match_rate(probabilities: Tensor, labels: Tensor) -> float:
    """The fraction of images whose argmax class is the original label.

    Args:
        probabilities: (n, 10) classifier probabilities.
        labels: (n,) original classes.
    """
    if len(labels) == 0:
        return 0.0
    return float((probabilities.argmax(dim=1) == labels).double().mean())


def summarize_half(
    half: str,
    completion_probabilities: Tensor,
    baseline_probabilities: Tensor,
    labels: Tensor,
    known_error: float,
) -> dict[str, Any]:
    """Scores of one masked half; it passes when the model beats the mean-fill baseline clearly (a
    paired z-score of at least ``MIN_Z`` over images) and the known half is preserved (error <=
    ``KNOWN_TOLERANCE``).

    The paired difference of image i is (its completions' match rate) - (its mean fill's match, 0 or
    1); z = mean / (std / sqrt(n)).

    Args:
        half: the mask preset's name.
        completion_probabilities: (m, 10) for the model's completions (m = n * completions per
            image, image-major).
        baseline_probabilities: (n, 10) for the mean-filled images.
        labels: (n,) the originals' classes.
        known_error: ``known_pixel_error`` of the completions.

    Returns:
        JSON-ready dict.
    """
    repeats = max(1, len(completion_probabilities) // max(1, len(labels)))
    model_rate = class_match_rate(completion_probabilities, labels.repeat_interleave(repeats))
    baseline_rate = class_match_rate(baseline_probabilities, labels)
    known_preserved = known_error <= KNOWN_TOLERANCE
    model_hits = completion_probabilities.argmax(1) == labels.repeat_interleave(repeats)
    baseline_hits = baseline_probabilities.argmax(1) == labels
    paired = model_hits.double().reshape(-1, repeats).mean(1) - baseline_hits.double()
    z = _paired_z(paired)
    return {
        "mask": half,
        "model_class_rate": model_rate,
        "baseline_class_rate": baseline_rate,
        "improvement": model_rate - baseline_rate,
        "paired_z": z,
        "known_max_abs_error": known_error,
        "known_preserved": known_preserved,
        "passes": bool(model_rate > baseline_rate and z >= MIN_Z and known_preserved),
    }


def _paired_z(differences: Tensor) -> float:
    """mean / standard error of per-image differences (inf for a constant positive difference)."""
    n = differences.numel()
    if n == 0:
        return 0.0
    mean = float(differences.mean())
    se = float(differences.std()) / n**0.5 if n > 1 else 0.0
    if se == 0.0:
        return math.copysign(math.inf, mean) if mean else 0.0
    return mean / se


def markdown_table(result: dict[str, Any]) -> str:
    """A markdown table of ``run``'s per-half results."""
    lines = [
        f"Inpainting {result['num_images']} test digits, {result['completions_per_image']} "
        "completion(s) each; rate = fraction classified as the original digit.",
        "",
        "| masked half | model | mean-fill baseline | paired z | unmasked | known half preserved | pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["halves"]:
        lines.append(
            f"| {row['mask']} | {row['model_class_rate']:.3f} | {row['baseline_class_rate']:.3f} "
            f"| {row['paired_z']:.1f} | {result['unmasked_class_rate']:.3f} | {'yes' if row['known_preserved'] else 'NO'} "
            f"(max error {row['known_max_abs_error']:.1e}) | {'ok' if row['passes'] else 'FAIL'} |"
        )
    lines += ["", "PASS" if result["passes"] else "FAIL", ""]
    return "\n".join(lines)


def run(
    pipeline,
    classifier,
    images: Tensor,
    labels: Tensor,
    mean: Tensor,
    *,
    seed: int = 0,
    completions_per_image: int = 1,
    batch_size: int = 500,
    resample: int = 0,
) -> tuple[dict[str, Any], Tensor]:
    """Complete every half-masked image and score it.

    Args:
        pipeline: a ``CDRLPipeline`` of an 8x8 one-channel model.
        classifier: a ``DigitsClassifier``.
        images: (n, 1, 8, 8) test digits in [-1, 1].
        labels: (n,) their classes.
        mean: (1, 8, 8) mean training digit in [-1, 1].
        seed: completion k of a half draws its noise from seed + k.
        completions_per_image: completions of each image.
        batch_size: samples per pipeline call.
        resample: RePaint resampling passes per level.

    Returns:
        The JSON-ready result, and a figure tensor (rows of originals, masked inputs and first
        completions for each half) in [-1, 1].
    """
    n, size = images.shape[0], images.shape[-1]
    rows = []
    halves = []
    shown = min(n, FIGURE_COLUMNS)
    for half in HALVES:
        repaint = torch.from_numpy(preset_mask(half, size)).reshape(1, 1, size, size)
        done = complete(
            pipeline,
            (images + 1) / 2,
            repaint.expand(n, -1, -1, -1),
            num_samples=completions_per_image,
            seed=seed,
            batch_size=batch_size,
            resample=resample,
        )  # (n, m, 1, 8, 8) in [0, 1]
        completions = done.flatten(0, 1) * 2 - 1  # image-major
        error = known_pixel_error(
            completions, images.repeat_interleave(completions_per_image, 0), repaint
        )
        baseline = fill_with_mean(images, repaint, mean)
        halves.append(
            summarize_half(
                half,
                predict_probabilities(classifier, completions),
                predict_probabilities(classifier, baseline),
                labels,
                error,
            )
        )
        masked = fill_with_mean(images, repaint, torch.zeros_like(mean))  # the hole in grey
        rows += [images[:shown], masked[:shown], done[:shown, 0] * 2 - 1]
    unmasked = class_match_rate(predict_probabilities(classifier, images), labels)
    result = {
        "num_images": n,
        "completions_per_image": completions_per_image,
        "resample": resample,
        "unmasked_class_rate": unmasked,
        "halves": halves,
        "passes": all(row["passes"] for row in halves),
    }
    return result, torch.cat(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] + " (mask 1 / white = repaint, 0 / black = keep)"
    )
    parser.add_argument("--checkpoint", required=True, help="exported pipeline (or run) folder")
    parser.add_argument("--num_images", type=int, default=200, help="test digits (at most 360)")
    parser.add_argument("--seed", type=int, default=0, help="picks the digits and the noise")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--completions_per_image", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument(
        "--resample", type=int, default=0, help="RePaint resampling passes per level"
    )
    parser.add_argument(
        "--classifier", type=Path, default=None, help="digits classifier folder (default: cache)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = parser.parse_args(argv)
    if min(args.num_images, args.completions_per_image, args.batch_size) < 1:
        parser.error("--num_images, --completions_per_image and --batch_size must be positive")

    diffusers_logging.disable_progress_bar()
    try:
        pipeline = load_pipeline(args.checkpoint, args.device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    pipeline.set_progress_bar_config(disable=True)
    if tuple(pipeline.sample_shape) != (1, 8, 8):
        raise SystemExit(f"error: {args.checkpoint} is not an 8x8 digits model")
    classifier = load_digits_classifier(args.classifier)

    # A seeded subset of the real test digits; the baseline's mean comes from the train split.
    x_train, _, x_test, y_test = digits_split()
    pick = np.sort(np.random.default_rng(args.seed).permutation(len(y_test))[: args.num_images])
    images, labels = x_test[pick], y_test[pick]
    start = time.perf_counter()
    result, figure = run(
        pipeline,
        classifier,
        images,
        labels,
        x_train.mean(0),
        seed=args.seed,
        completions_per_image=args.completions_per_image,
        batch_size=args.batch_size,
        resample=args.resample,
    )
    result = {
        "checkpoint": str(args.checkpoint),
        "seed": args.seed,
        "seconds": time.perf_counter() - start,
        "git_sha": git_sha(),
        **result,
    }
    table = markdown_table(result)
    print(table, end="")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "inpaint_digits.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output_dir / "inpaint_digits.md").write_text(table)
    columns = min(len(images), FIGURE_COLUMNS)
    save_grid(figure, args.output_dir / "inpaint_digits.png", nrow=columns, upscale=6)
    return 0 if result["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
