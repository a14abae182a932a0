"""Judge a trained 8x8-digits generator with an independent classifier, and check it does not copy.

Usage: python experiments/digits_quality.py --checkpoint DIR [--num_samples 1000] [--seed 0]
       [--batch_size 500] [--classifier PATH] [--output results.json] [--grid samples.png]
       [--labels prior|null] [--guidance_scale 1]

A class-conditional model is sampled as the model of p(x) = sum_c p(c) p(x | c) it is: each sample's class
is drawn from the training split's label frequencies, then the sample from the conditional, at
guidance_scale 1 (no guidance) unless asked (``--labels prior``, the default). ``--labels null`` samples
the null label instead (the model's unconditional mode, trained on 10% of the steps' labels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdrl.evaluation.digits import (
    MAX_CLASS_FRACTION,
    MIN_CONFIDENT_FRACTION,
    DigitsClassifier,
    digits_split,
    judge_digits,
    load_digits_classifier,
    novelty,
)
from cdrl.images import save_grid
from cdrl.utils import git_sha

MAX_COPY_FRACTION = 0.05  # pass: at most this fraction of samples closer to a training digit than
# the 1st percentile of real test digits are


def measure(
    images: Tensor,
    classifier: DigitsClassifier,
    train: Tensor,
    *,
    reference: Tensor | None = None,
    max_copy_fraction: float = MAX_COPY_FRACTION,
) -> dict[str, Any]:
    """Classifier judgement and novelty of digits.

    Args:
        images: (n, 1, 8, 8) digits in [-1, 1].
        classifier: a trained ``DigitsClassifier``.
        train: (m, 1, 8, 8) the generator's training digits in [-1, 1].
        reference: (k, 1, 8, 8) held-out real digits for the copy threshold; default the test split.
        max_copy_fraction: the largest copy fraction that passes.

    Returns:
        JSON-ready dict: ``judge`` (``judge_digits``), ``novelty`` (``novelty``), ``thresholds`` and
        ``passes`` (the judge passes and the copy fraction is at most ``max_copy_fraction``).
    """
    judged = judge_digits(images, classifier)
    nov = novelty(images, train, reference=reference)
    return {
        "judge": judged,
        "novelty": nov,
        "thresholds": {
            "confidence": judged["confidence"],
            "min_confident_fraction": MIN_CONFIDENT_FRACTION,
            "max_class_fraction": MAX_CLASS_FRACTION,
            "max_copy_fraction": max_copy_fraction,
        },
        "passes": bool(judged["passes"] and nov["copy_fraction"] <= max_copy_fraction),
    }


def prior_labels(num_samples: int, seed: int) -> Tensor:
    """(num_samples,) class labels drawn from the training split's label frequencies."""
    _, y_train, _, _ = digits_split()
    frequencies = torch.bincount(y_train, minlength=10).float()
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(frequencies, num_samples, replacement=True, generator=generator)


def generate(
    checkpoint: Path,
    num_samples: int,
    seed: int,
    batch_size: int,
    device: str,
    *,
    labels: str = "prior",
    guidance_scale: float = 1.0,
) -> Tensor:
    """Sample a saved pipeline in batches seeded ``seed``, ``seed + 1``, ...

    A class-conditional pipeline gets class labels drawn from the training label frequencies
    (``labels="prior"``) or the null label (``labels="null"``); an unconditional one ignores both.

    Returns:
        (num_samples, 1, 8, 8) float32 CPU tensor in [-1, 1].
    """
    from cdrl import CDRLPipeline

    pipe = CDRLPipeline.from_pretrained(str(checkpoint)).to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    conditional = bool(pipe.condition_sizes) and labels == "prior"
    if not conditional and guidance_scale != 1.0:
        raise SystemExit(
            "error: --guidance_scale needs a class-conditional model and --labels prior"
        )
    classes = prior_labels(num_samples, seed) if conditional else None
    chunks = []
    for index, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        extra = {}
        if classes is not None:
            extra = {"class_labels": classes[start : start + n], "guidance_scale": guidance_scale}
        out = pipe(
            batch_size=n,
            generator=torch.Generator().manual_seed(seed + index),
            output_type="pt",
            **extra,
        )
        chunks.append(torch.as_tensor(out.images).detach().float().cpu())
    images = torch.cat(chunks) * 2 - 1  # diffusers' [0, 1] -> [-1, 1]
    if images.shape != (num_samples, 1, 8, 8):
        raise SystemExit(
            f"error: expected ({num_samples}, 1, 8, 8) images, got {tuple(images.shape)}"
        )
    return images


def print_table(result: dict[str, Any]) -> None:
    """A readable summary of ``measure``'s result."""
    judged, nov, thr = result["judge"], result["novelty"], result["thresholds"]

    def mark(ok: bool) -> str:
        return "ok" if ok else "FAIL"

    rows = [
        (
            f"confident (p >= {thr['confidence']})",
            f"{judged['confident_fraction']:.3f}",
            f">= {thr['min_confident_fraction']}",
            mark(judged["confident_fraction"] >= thr["min_confident_fraction"]),
        ),
        (
            "classes present",
            f"{judged['classes_present']}",
            "== 10",
            mark(judged["classes_present"] == len(judged["class_histogram"])),
        ),
        (
            "max class fraction",
            f"{judged['max_class_fraction']:.3f}",
            f"<= {thr['max_class_fraction']}",
            mark(judged["max_class_fraction"] <= thr["max_class_fraction"]),
        ),
        (
            "copy fraction",
            f"{nov['copy_fraction']:.3f}",
            f"<= {thr['max_copy_fraction']}",
            mark(nov["copy_fraction"] <= thr["max_copy_fraction"]),
        ),
    ]
    print(f"{'metric':<24} {'value':>8}  {'target':<8} result")
    for name, value, target, ok in rows:
        print(f"{name:<24} {value:>8}  {target:<8} {ok}")
    histogram = " ".join(f"{d}:{f:.2f}" for d, f in enumerate(judged["class_histogram"]))
    print(f"class histogram (argmax): {histogram}")
    print(
        f"NN distance to train: mean {nov['nn_distance_mean']:.3f} median "
        f"{nov['nn_distance_median']:.3f} (real test digits: median "
        f"{nov['reference_nn_distance_median']:.3f}, copy threshold {nov['copy_threshold']:.3f})"
    )
    print("PASS" if result["passes"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="saved pipeline folder")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument(
        "--classifier", type=Path, default=None, help="digits classifier folder (default: cache)"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the scores as JSON here")
    parser.add_argument("--grid", type=Path, default=None, help="save a 10x10 PNG of samples here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--check", action="store_true", help="exit with code 1 when a target is missed"
    )
    parser.add_argument(
        "--labels",
        choices=("prior", "null"),
        default="prior",
        help="class-conditional models: draw each sample's class from the training label frequencies "
        "(prior, default) or sample the null label (null)",
    )
    parser.add_argument(
        "--guidance_scale", type=float, default=1.0, help="with --labels prior (1: no guidance)"
    )
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num_samples and --batch_size must be positive")

    classifier = load_digits_classifier(args.classifier)
    start = time.perf_counter()
    images = generate(
        args.checkpoint,
        args.num_samples,
        args.seed,
        args.batch_size,
        args.device,
        labels=args.labels,
        guidance_scale=args.guidance_scale,
    )
    seconds = time.perf_counter() - start
    x_train, _, x_test, _ = digits_split()
    result = {
        "checkpoint": str(args.checkpoint),
        "num_samples": args.num_samples,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "labels": args.labels,
        "guidance_scale": args.guidance_scale,
        "sampling_seconds": seconds,
        "git_sha": git_sha(),
        **measure(images, classifier, x_train, reference=x_test),
    }
    print_table(result)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    if args.grid is not None:
        save_grid(images[:100], args.grid, nrow=10, upscale=4)
    return 0 if result["passes"] or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
