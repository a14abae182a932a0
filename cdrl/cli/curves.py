"""``cdrl-curves RUN [--output PNG]``: redraw a run folder's training curves (``cdrl.training.curves``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cdrl.training.curves import CURVES_FILE, plot_curves


def main(argv: Sequence[str] | None = None) -> int:
    """``cdrl-curves RUN [--output PNG]``: one line ``error: ...`` and exit code 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="cdrl-curves",
        description="Training curves of a run folder as one PNG, from its metrics.jsonl.",
    )
    parser.add_argument("run", type=Path, help="a run folder (holding metrics.jsonl)")
    parser.add_argument("--output", type=Path, help=f"the PNG (default RUN/{CURVES_FILE})")
    args = parser.parse_args(argv)
    metrics = args.run / "metrics.jsonl"
    try:
        if not metrics.is_file():
            raise ValueError(f"{args.run} is not a run folder: it has no metrics.jsonl")
        path = plot_curves(metrics, args.output or args.run / CURVES_FILE)
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
