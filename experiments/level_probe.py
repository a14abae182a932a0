"""Which recovery level loses sample quality? Start the reverse chain at real, forward-diffused test digits.

For s = T (pure noise, ordinary sampling) down to 1, draw x_s ~ q(x_s | x_0) for real test digits x_0, run
the model's recovery steps s-1, ..., 0 and the Tweedie step, and judge the result with the independent
digits classifier: the fraction classified with confidence >= 0.9, and how often the class of the original
digit survives. A drop between start levels s+1 and s is the quality lost by level s (docs/method.md, Sec. 11).

    python experiments/level_probe.py --checkpoint runs/digits/pipeline --num_images 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdrl.config import LangevinConfig
from cdrl.evaluation.digits import digits_split, judge_digits, load_digits_classifier
from cdrl.sampling import frozen, reverse_step, tweedie_denoise


def probe(
    pipe: Any,
    x0: Tensor,
    labels: Tensor,
    classifier: torch.nn.Module,
    *,
    settings: LangevinConfig | None = None,
    seed: int = 0,
) -> list[dict[str, float | int]]:
    """One row per start level s = T..1: ``confident`` and ``same_class`` (NaN for s = T)."""
    schedule = pipe.scheduler.schedule
    settings = settings or pipe.scheduler.langevin_settings()
    scale = pipe.scheduler.config.data_scale
    rows = []
    for s in range(schedule.num_levels, 0, -1):
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(x0.shape, generator=gen)
        if s == schedule.num_levels:
            x = noise
        else:
            ab = schedule.alphas_cumprod[s]
            x = ab.sqrt() * x0 * scale + (1 - ab).sqrt() * noise
        with frozen(pipe.ebm, pipe.initializer):
            for t in reversed(range(s)):
                x = reverse_step(
                    pipe.ebm, pipe.initializer, schedule, x, t, settings, generator=gen
                )
            if settings.tweedie:
                x = tweedie_denoise(pipe.ebm, schedule, x, settings)
        images = (x / scale).clamp(-1, 1)
        judged = judge_digits(images, classifier)
        probs = classifier.probabilities(images)
        same = (probs.argmax(dim=1) == labels).double().mean().item()
        rows.append(
            {
                "start_level": s,
                "confident": judged["confident_fraction"],
                "same_class": float("nan") if s == schedule.num_levels else same,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a digits pipeline folder")
    parser.add_argument("--num_images", type=int, default=300, help="test digits (at most 360)")
    parser.add_argument("--num_langevin_steps", type=int, default=None)
    parser.add_argument("--langevin_noise_scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    from cdrl.export import load_pipeline

    pipe = load_pipeline(args.checkpoint, device="cpu")
    settings = pipe.scheduler.langevin_settings()
    if args.num_langevin_steps is not None:
        settings = dataclasses.replace(settings, n_steps=args.num_langevin_steps)
    if args.langevin_noise_scale is not None:
        settings = dataclasses.replace(settings, noise_scale=args.langevin_noise_scale)
    _, _, x_test, y_test = digits_split()
    rows = probe(
        pipe,
        x_test[: args.num_images],
        y_test[: args.num_images],
        load_digits_classifier(),
        settings=settings,
        seed=args.seed,
    )
    print("| chain starts at | confident (p >= 0.9) | class of the original kept |")
    print("|---|---|---|")
    for row in rows:
        start = (
            "x_T ~ N(0, I)"
            if row["same_class"] != row["same_class"]
            else f"real x_{row['start_level']}"
        )
        print(f"| {start} | {row['confident']:.3f} | {row['same_class']:.3f} |")
    if args.output is not None:
        args.output.write_text(json.dumps({"settings": vars(settings), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
