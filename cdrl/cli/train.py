"""``cdrl-train`` / ``train.py``: ``accelerate launch train.py --config configs/digits.yaml [--set key=value
...] [flags]``. The flags are diffusers' well-known run flags; everything else is ``--set`` on the config."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from cdrl.cli.common import EXIT_BAD_INPUT, ArgumentParser, CLIError, add_config_overrides
from cdrl.config import DEFAULT_RECIPE, Config, config_path, load_config, recipe_names
from cdrl.training.guard import DivergenceError
from cdrl.training.loop import run
from cdrl.utils import (
    CheckpointError,
    ConfigError,
    DataError,
    UsageError,
    describe_out_of_memory,
    is_out_of_memory,
)

FLAG_TO_KEY = {
    "output_dir": "log.output_dir",
    "train_batch_size": "train.batch_size",
    "max_train_steps": "train.max_steps",
    "learning_rate": "train.ebm_lr",
    "mixed_precision": "train.mixed_precision",
    "checkpointing_steps": "log.checkpointing_steps",
    "checkpoints_total_limit": "log.checkpoints_total_limit",
    "seed": "train.seed",
    "report_to": "log.report_to",
}


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = ArgumentParser(
        prog="train.py",
        description="Train a CDRL (or DRL) energy-based model. Launch with `accelerate launch train.py ...` "
        "for several processes; plain `python train.py` runs one.",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_RECIPE,
        help="a YAML file of the settings that differ from the defaults, or a packaged recipe by name "
        f"({', '.join(recipe_names())}); default: {DEFAULT_RECIPE}",
    )
    add_config_overrides(parser)
    parser.add_argument("--output_dir", help="run folder (log.output_dir)")
    parser.add_argument("--train_batch_size", help="batch size per process (train.batch_size)")
    parser.add_argument("--max_train_steps", help="optimizer steps (train.max_steps)")
    parser.add_argument("--learning_rate", help="EBM learning rate (train.ebm_lr)")
    parser.add_argument("--mixed_precision", help="no | fp16 | bf16 (train.mixed_precision)")
    parser.add_argument("--checkpointing_steps", help="steps between resumable checkpoints")
    parser.add_argument("--checkpoints_total_limit", help="keep at most this many checkpoints")
    parser.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-N folder")
    parser.add_argument("--seed", help="training seed (train.seed)")
    parser.add_argument("--report_to", help="tensorboard | wandb | none (log.report_to)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    overrides = list(args.set)
    overrides += [
        f"{key}={getattr(args, flag)}"
        for flag, key in FLAG_TO_KEY.items()
        if getattr(args, flag) is not None
    ]
    return load_config(config_path(args.config), overrides), args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input or divergence, with a one-line message)."""
    try:
        cfg, args = parse_args(argv)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
            return 0
        export_dir = run(cfg, resume=args.resume_from_checkpoint)
    except (ConfigError, DataError, UsageError, CheckpointError, CLIError, DivergenceError) as err:
        message = " ".join(str(err).split())
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        message = (
            f"{describe_out_of_memory(err)} with train.batch_size={cfg.train.batch_size} and "
            f"log.num_grid_samples={cfg.log.num_grid_samples}; lower them, or narrow the networks"
        )
    else:
        print(f"done: pipeline saved to {export_dir}")
        return 0
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
