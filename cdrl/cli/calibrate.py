"""``cdrl-calibrate``: fit a conditional checkpoint's implicit-classifier offsets on its training data and
store them in its scheduler config (``cdrl.export.calibrate_checkpoint``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cdrl.checks import MAX_SAMPLES, check_device
from cdrl.cli.common import ArgumentParser, CLIError, check_upper_bounds, run_cli
from cdrl.export import calibrate_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    """``cdrl-calibrate``: fit a conditional checkpoint's offsets on its training data and store them."""
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = ArgumentParser(
        prog="cdrl-calibrate",
        description=(
            "Fit the implicit-classifier offsets of a conditional CDRL checkpoint on its training data "
            "(what composition with negation='posterior' needs) and store them in the checkpoint's "
            "scheduler config. train.py does this itself for conditional models; use this command on a "
            "checkpoint exported before it did."
        ),
    )
    parser.add_argument(
        "--checkpoint", required=True, help="an exported pipeline folder (or its run folder)"
    )
    parser.add_argument(
        "--num_samples", type=int, default=4096, help="training examples used (default 4096)"
    )
    parser.add_argument("--seed", type=int, default=0, help="picks the examples and their noise")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        raise CLIError(f"--num_samples must be >= 1, got {args.num_samples}")
    check_upper_bounds(args, num_samples=MAX_SAMPLES)
    check_device(args.device)
    folder = calibrate_checkpoint(
        args.checkpoint, num_samples=args.num_samples, seed=args.seed, device=args.device
    )
    print(f"stored the calibrated condition offsets in {folder / 'scheduler'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
