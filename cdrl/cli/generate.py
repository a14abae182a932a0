"""``cdrl-generate``: class-conditional samples with classifier-free guidance, or unconditional.

Sample k draws all its noise from its own generator seeded ``seed + k`` (EDM's
StackedRandomGenerator), so it does not depend on the batch size. A ``.png`` output is one grid with
one row per requested class; any other output is a folder of ``000000.png ...`` and a
``manifest.json``. Bad input: one line ``error: ...`` on stderr, exit code 2, nothing written.

    cdrl-generate --checkpoint runs/digits_cond --all_classes --num_samples_per_class 10 \\
        --guidance_scale 2 --output samples.png
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from cdrl.checks import MAX_LANGEVIN_STEPS, MAX_SAMPLES, check_device
from cdrl.cli.common import (
    ArgumentParser,
    CLIError,
    check_finite,
    check_upper_bounds,
    requested_classes,
    run_cli,
)
from cdrl.export import load_pipeline, read_model_config, resolve_checkpoint
from cdrl.generation import generate_samples, write_folder
from cdrl.images import save_grid
from cdrl.training.checkpoint import CHECKPOINT_RE
from cdrl.utils import atomic_write, check_output_folder, check_writable

DEFAULT_NUM_SAMPLES = 16  # unconditional sampling
GRID_MIN_TILE = 32  # grid PNGs upscale small samples (8x8 digits) to at least this many pixels
OTHER_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (usage errors are one-line CLIErrors)."""
    parser = ArgumentParser(prog="cdrl-generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a pipeline folder (model_index.json), or a run folder holding one in pipeline/",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--class_labels",
        type=int,
        nargs="+",
        metavar="C",
        help="class ids to sample, one grid row each (needs a class-conditional checkpoint)",
    )
    which.add_argument("--all_classes", action="store_true", help="sample every class 0..n-1")
    parser.add_argument(
        "--num_samples_per_class",
        type=int,
        default=None,
        metavar="N",
        help="with classes (default 1)",
    )
    parser.add_argument(
        "--num_samples",
        type=int,
        default=None,
        metavar="N",
        help=f"without classes: unconditional samples (default {DEFAULT_NUM_SAMPLES})",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        metavar="S",
        help="classifier-free guidance, diffusers' meaning: 1 = off (plain conditional), 0 = "
        "unconditional, > 1 stronger; the paper's w = S - 1",
    )
    parser.add_argument(
        "--num_langevin_steps",
        type=int,
        default=None,
        metavar="K",
        help="Langevin steps per noise level (default: the trained value; 0: initializer only)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sample k uses seed + k (default 0)")
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="a .png path: one grid, one row per class; otherwise a folder of PNGs + manifest.json",
    )
    parser.add_argument(
        "--batch_size", type=int, default=256, help="samples per forward (default 256)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available)",
    )
    return parser


def plan_labels(args: argparse.Namespace, condition_sizes: Sequence[int]) -> list[int] | None:
    """One class label per sample (class-major order), or None for unconditional sampling.

    Raises:
        CLIError: a flag combination or value that does not fit the flags or the checkpoint.
    """
    check_finite(args, "guidance_scale")
    if args.guidance_scale < 0:
        raise CLIError(
            f"--guidance_scale must be >= 0 (1 = no guidance), got {args.guidance_scale:g}"
        )
    check_upper_bounds(
        args,
        num_samples_per_class=MAX_SAMPLES,
        num_samples=MAX_SAMPLES,
        batch_size=MAX_SAMPLES,
        num_langevin_steps=MAX_LANGEVIN_STEPS,
    )
    check_device(args.device)
    for name in ("num_samples_per_class", "num_samples", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name} must be at least 1, got {value}")
    if args.num_langevin_steps is not None and args.num_langevin_steps < 0:
        raise CLIError(f"--num_langevin_steps must be >= 0, got {args.num_langevin_steps}")
    if (
        args.class_labels is None
        and not args.all_classes
        and args.num_samples_per_class is not None
    ):
        raise CLIError("--num_samples_per_class needs --class_labels or --all_classes")
    classes = requested_classes(
        args.class_labels, args.all_classes, args.guidance_scale, condition_sizes, args.checkpoint
    )
    if classes is None:
        return None
    if args.num_samples is not None:
        flag = "--all_classes" if args.all_classes else "--class_labels"
        raise CLIError(
            f"--num_samples is for unconditional sampling; with {flag} use --num_samples_per_class"
        )
    per_class = args.num_samples_per_class or 1
    if per_class * len(classes) > MAX_SAMPLES:
        raise CLIError(
            f"{len(classes)} classes x --num_samples_per_class {per_class:,} is more than "
            f"{MAX_SAMPLES:,} samples"
        )
    return [label for label in classes for _ in range(per_class)]


def check_output(output: Path) -> bool:
    """Check ``output`` without writing anything; True for a grid (``.png``), False for a folder."""
    suffix = output.suffix.lower()
    if suffix in OTHER_IMAGE_SUFFIXES:
        raise CLIError(
            f"--output {output}: grids are written as .png; give a .png path or a folder"
        )
    is_grid = suffix == ".png"
    existing = next(parent for parent in output.parents if parent.exists())
    if not existing.is_dir():
        raise CLIError(f"--output {output} cannot be written: {existing} is a file, not a folder")
    if is_grid and output.is_dir():
        raise CLIError(f"--output {output} is a folder; a grid needs a .png file path")
    if not is_grid:
        check_output_folder(output)
    return is_grid


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)

    # Check the flags against the checkpoint's config, and the output path, before loading weights.
    if CHECKPOINT_RE.fullmatch(args.checkpoint.name) and args.checkpoint.is_dir():
        raise CLIError(
            "--checkpoint: a training checkpoint is not an exported pipeline; export it with "
            f"`cdrl-export --checkpoint {args.checkpoint} --output DIR`, then pass --checkpoint DIR"
        )
    checkpoint = resolve_checkpoint(args.checkpoint)
    config = read_model_config(checkpoint)
    if "in_features" in config:
        raise CLIError(
            f"checkpoint {checkpoint} makes {config['in_features']}-d vectors, not images"
        )
    labels = plan_labels(args, tuple(config.get("condition_sizes") or ()))
    is_grid = check_output(args.output)

    pipe = load_pipeline(checkpoint, args.device)
    check_writable(args.output)  # creates nothing: the output appears once complete
    num_samples = len(labels) if labels is not None else args.num_samples or DEFAULT_NUM_SAMPLES
    seeds = range(args.seed, args.seed + num_samples)  # not a list: --num_samples may be huge
    images = generate_samples(
        pipe,
        labels,
        seeds,
        guidance_scale=args.guidance_scale,
        num_langevin_steps=args.num_langevin_steps,
        batch_size=args.batch_size,
    )

    # Write into a temporary sibling, renamed into place only once complete.
    with atomic_write(args.output, folder=not is_grid) as tmp:
        if is_grid:
            per_row = (args.num_samples_per_class or 1) if labels is not None else None
            upscale = max(1, math.ceil(GRID_MIN_TILE / images.shape[-1]))
            save_grid(images, tmp, nrow=per_row, upscale=upscale)
        else:
            guidance = args.guidance_scale if labels is not None else None
            records = [
                {
                    "file": f"{k:06d}.png",
                    "label": None if labels is None else labels[k],
                    "seed": seed,
                    "guidance_scale": guidance,
                }
                for k, seed in enumerate(seeds)
            ]
            info = {
                "checkpoint": str(checkpoint),
                "num_langevin_steps": pipe.scheduler.langevin_settings(
                    n_steps=args.num_langevin_steps
                ).n_steps,
                "guidance_scale": guidance,
            }
            write_folder(images, tmp, records, info)
    print(f"wrote {num_samples} samples to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cdrl-generate`` and ``generate.py``: the exit code (2: bad input)."""
    return run_cli(_main, argv, memory_hint="use a smaller --batch_size (samples per forward)")


if __name__ == "__main__":
    raise SystemExit(main())
