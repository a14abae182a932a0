"""Classifier-free guidance sweep on a class-conditional 8x8-digits model: accuracy vs diversity.

For each guidance scale, generate ``--num_samples_per_class`` digits per class (sample k seeded
seed + k, the same noise at every scale), judge them with the independent digits classifier
(accuracy of the argmax against the requested label, confident fraction) and measure diversity
(mean pairwise L2 distance within each class, averaged over classes), next to the same numbers for
the real test digits.

Usage: python experiments/guidance_sweep.py --checkpoint DIR --guidance_scales 1 1.5 2 3 4
       --num_samples_per_class 50 --seed 0 --output_dir DIR
Writes guidance_sweep.json, guidance_sweep.md, guidance_sweep.png and one sample grid per scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdrl.cli.common import CLIError, run_cli
from cdrl.evaluation.digits import (
    DigitsClassifier,
    digits_split,
    load_digits_classifier,
    predict_probabilities,
)
from cdrl.export import load_pipeline
from cdrl.generation import generate_samples
from cdrl.images import save_grid
from cdrl.utils import (
    atomic_write,
    check_writable,
    git_sha,
)

CONFIDENCE = 0.9  # a confident classification: max probability >= this (as judge_digits)
GRID_SAMPLES_PER_CLASS = 10


def class_diversity(images: Tensor, labels: Tensor) -> dict[int, float]:
    """Mean pairwise L2 distance (flattened pixels in [-1, 1]) between the images of each class.

    Args:
        images: (n, c, h, w) images.
        labels: (n,) int labels.

    Returns:
        {class: mean pairwise distance} for every class with at least two images.
    """
    flat = images.reshape(images.shape[0], -1).double().cpu()
    labels = labels.cpu()
    out = {}
    for label in torch.unique(labels).tolist():
        members = flat[labels == label]
        if members.shape[0] >= 2:
            out[int(label)] = torch.pdist(members).mean().item()
    return out


def measure(
    images: Tensor, labels: Tensor, classifier: DigitsClassifier, *, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """How recognisable and how diverse class-conditional digits are.

    Args:
        images: (n, 1, 8, 8) digits in [-1, 1].
        labels: (n,) the class each digit was generated for (or, for real digits, its true class).
        classifier: a trained ``DigitsClassifier``.
        confidence: the max-probability threshold of a confident classification.

    Returns:
        JSON-ready dict: ``num_samples``; ``accuracy`` (argmax == label); ``confident_fraction``
        (max probability >= ``confidence``); ``confident_accuracy`` (confident and correct);
        ``mean_label_probability`` (the classifier's probability of the requested label);
        ``per_class_accuracy``; ``diversity`` (per-class mean pairwise L2 distance, averaged over
        classes) and ``per_class_diversity``. Per-class dicts have string keys.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    probs = predict_probabilities(classifier, images)
    max_prob, pred = probs.max(dim=1)
    correct = pred == labels
    confident = max_prob >= confidence
    per_class_accuracy = {
        str(label): correct[labels == label].double().mean().item()
        for label in torch.unique(labels).tolist()
    }
    per_class_diversity = class_diversity(images, labels)
    return {
        "num_samples": int(labels.numel()),
        "accuracy": correct.double().mean().item(),
        "confident_fraction": confident.double().mean().item(),
        "confident_accuracy": (correct & confident).double().mean().item(),
        "mean_label_probability": probs.gather(1, labels[:, None]).double().mean().item(),
        "per_class_accuracy": per_class_accuracy,
        "diversity": (
            sum(per_class_diversity.values()) / len(per_class_diversity)
            if per_class_diversity
            else float("nan")
        ),
        "per_class_diversity": {str(k): v for k, v in per_class_diversity.items()},
    }


def markdown_table(results: list[dict[str, Any]], reference: dict[str, Any]) -> str:
    """One row per guidance scale, then the real test digits."""
    lines = [
        "| guidance_scale | w | accuracy | confident | confident & correct | diversity |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        m = row["metrics"]
        lines.append(
            f"| {row['guidance_scale']:g} | {row['w']:g} | {m['accuracy']:.3f} | "
            f"{m['confident_fraction']:.3f} | {m['confident_accuracy']:.3f} | "
            f"{m['diversity']:.3f} |"
        )
    lines.append(
        f"| real test digits | | {reference['accuracy']:.3f} | "
        f"{reference['confident_fraction']:.3f} | "
        f"{reference['confident_accuracy']:.3f} | {reference['diversity']:.3f} |"
    )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], reference: dict[str, Any], path: Path) -> None:
    """Accuracy and diversity against the guidance scale, the real digits as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [row["guidance_scale"] for row in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, name in (("accuracy", "accuracy"), ("confident_fraction", "confident")):
        left.plot(scales, [row["metrics"][key] for row in results], marker="o", label=name)
    left.axhline(reference["accuracy"], color="gray", linestyle="--", label="real accuracy")
    left.set(xlabel="guidance scale (1 + w)", ylabel="fraction", ylim=(0, 1.02), title="classifier")
    left.legend(loc="best")
    right.plot(
        scales, [row["metrics"]["diversity"] for row in results], marker="o", label="generated"
    )
    right.axhline(reference["diversity"], color="gray", linestyle="--", label="real test digits")
    right.set(
        xlabel="guidance scale (1 + w)", ylabel="mean pairwise L2", title="within-class diversity"
    )
    right.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="conditional digits pipeline"
    )
    parser.add_argument(
        "--guidance_scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0]
    )
    parser.add_argument("--num_samples_per_class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_langevin_steps", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument(
        "--classifier", type=Path, default=None, help="digits classifier folder (default: cache)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if min(args.guidance_scales) < 0:
        raise CLIError(f"guidance scales must be >= 0, got {args.guidance_scales}")
    if args.num_samples_per_class < 2 or args.batch_size < 1:
        raise CLIError("--num_samples_per_class must be >= 2 (diversity) and --batch_size >= 1")

    pipe = load_pipeline(args.checkpoint, args.device)
    sizes = pipe.condition_sizes
    if pipe.sample_shape != (1, 8, 8) or not sizes or sizes[0] != 10:
        raise CLIError(
            f"{args.checkpoint} is not a class-conditional 8x8 digits model "
            f"(sample shape {pipe.sample_shape}, conditions {sizes})"
        )
    check_writable(args.output_dir)
    classifier = load_digits_classifier(args.classifier)
    _, _, x_test, y_test = digits_split()
    reference = measure(x_test, y_test, classifier)

    # The same labels and seeds at every scale (common random numbers), so only guidance changes.
    labels = [label for label in range(10) for _ in range(args.num_samples_per_class)]
    seeds = [args.seed + k for k in range(len(labels))]
    results = []
    for scale in args.guidance_scales:
        start = time.perf_counter()
        images = generate_samples(
            pipe,
            labels,
            seeds,
            guidance_scale=scale,
            num_langevin_steps=args.num_langevin_steps,
            batch_size=args.batch_size,
        )
        seconds = time.perf_counter() - start
        metrics = measure(images, torch.tensor(labels), classifier)
        results.append(
            {"guidance_scale": scale, "w": scale - 1, "seconds": seconds, "metrics": metrics}
        )
        print(
            f"guidance_scale {scale:g}: accuracy {metrics['accuracy']:.3f}, confident "
            f"{metrics['confident_fraction']:.3f}, diversity {metrics['diversity']:.3f} "
            f"({seconds:.1f} s)"
        )
        shown = torch.cat(
            [chunk[:GRID_SAMPLES_PER_CLASS] for chunk in images.split(args.num_samples_per_class)]
        )
        save_grid(
            shown,
            args.output_dir / f"samples_scale{scale:g}.png",
            nrow=min(GRID_SAMPLES_PER_CLASS, args.num_samples_per_class),
            upscale=4,
        )
    print(
        f"real test digits: accuracy {reference['accuracy']:.3f}, "
        f"diversity {reference['diversity']:.3f}"
    )

    summary = {
        "checkpoint": str(args.checkpoint),
        "num_samples_per_class": args.num_samples_per_class,
        "seed": args.seed,
        "num_langevin_steps": pipe.scheduler.langevin_settings(
            n_steps=args.num_langevin_steps
        ).n_steps,
        "confidence": CONFIDENCE,
        "git_sha": git_sha(),
        "real_test_digits": reference,
        "results": results,
    }
    out = args.output_dir
    with atomic_write(out / "guidance_sweep.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_write(out / "guidance_sweep.md") as tmp:
        tmp.write_text(markdown_table(results, reference))
    with atomic_write(out / "guidance_sweep.png") as tmp:
        plot(results, reference, tmp)
    print(f"wrote {out / 'guidance_sweep.json'}, .md and .png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; bad input is one line 'error: ...' and exit code 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
