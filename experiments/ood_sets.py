"""Out-of-distribution image folders for the digits OOD check of ``cdrl-evaluate --metrics ood``.

Writes two folders of 8x8 grayscale PNGs: ``inverted/`` (the held-out test digits with inverted colours:
white background, dark strokes) and ``noise/`` (uniform noise on [0, 255]), ``--num`` images each, seeded.
The in-distribution set is the test split itself (``--heldout digits-test``).

Usage: python experiments/ood_sets.py --output_dir ood/ [--num 200] [--seed 0]
then:  python evaluate.py --checkpoint DIR --metrics ood --heldout digits-test --ood ood/inverted ood/noise
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cdrl.cli.common import ArgumentParser, CLIError, run_cli
from cdrl.evaluation.digits import digits_split
from cdrl.images import to_uint8_images
from cdrl.utils import atomic_write, check_output_folder


def ood_images(num: int, seed: int) -> dict[str, np.ndarray]:
    """{"inverted": (n, 8, 8) uint8, "noise": (n, 8, 8) uint8}, n = min(num, 360) for the inverted set."""
    _, _, x_test, _ = digits_split()
    digits = to_uint8_images(x_test[:num])[..., 0]
    rng = np.random.default_rng(seed)
    return {
        "inverted": 255 - digits,
        "noise": rng.integers(0, 256, size=(num, 8, 8), dtype=np.uint8),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num", type=int, default=200, help="images per folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num < 1:
        raise CLIError(f"--num must be >= 1, got {args.num}")
    sets = ood_images(args.num, args.seed)
    for name in sets:  # refuse before writing anything: a folder of the user's is never replaced
        check_output_folder(args.output_dir / name, "--output_dir")
    for name, images in sets.items():
        with atomic_write(args.output_dir / name, folder=True) as folder:
            for i, image in enumerate(images):
                Image.fromarray(image).save(folder / f"{i:04d}.png")
        print(f"wrote {len(images)} images to {args.output_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
