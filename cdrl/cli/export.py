"""``cdrl-export``: the EMA pipeline of any saved step of a run, written as a pipeline folder with its model
card, without touching the run (its metrics, checkpoints and ``pipeline/`` stay as they are).

    cdrl-export --checkpoint runs/digits/checkpoint-20000 --output exports/digits-20k
    cdrl-generate --checkpoint exports/digits-20k --output samples.png

Bad input: one line ``error: ...`` on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from cdrl.cli.common import ArgumentParser, CLIError, run_cli
from cdrl.export import export_pipeline
from cdrl.training.run_dir import export_figures, run_command
from cdrl.training.state import check_run_checkpoint, checkpoint_pipeline
from cdrl.utils import check_output_folder, check_writable


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cdrl-export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a run's checkpoint-N folder (its config.yaml is read from the run folder above it)",
    )
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="the pipeline folder to write (new, empty, or an earlier export); never inside the run",
    )
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_run_checkpoint(args.checkpoint)
    run = args.checkpoint.parent.resolve()
    output = args.output.resolve()
    if output == run or run in output.parents:
        raise CLIError(
            f"--output {args.output} is inside the run folder {args.checkpoint.parent}: cdrl-export never "
            "changes a run; give a folder outside it"
        )
    if output in run.parents:
        raise CLIError(f"--output {args.output} holds the run; give a new or empty folder")
    check_output_folder(args.output)
    check_writable(args.output)  # creates nothing: the folder appears once complete

    pipeline, cfg, step = checkpoint_pipeline(args.checkpoint)
    export_pipeline(
        pipeline,
        cfg,
        args.output,
        step=step,
        command=run_command(args.checkpoint.parent),
        figures=export_figures(args.checkpoint.parent, step),
    )
    print(f"exported step {step} of {args.checkpoint.parent} to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cdrl-export``: the exit code (2: bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
