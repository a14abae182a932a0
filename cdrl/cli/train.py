"""``cdrl-train`` / ``train.py``: ``accelerate launch train.py --config configs/digits.yaml [--set key=value
...] [flags]``. The flags are diffusers' well-known run flags; everything else is ``--set`` on the config."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from cdrl.cli.common import ArgumentParser, CLIError, add_config_overrides, run_cli
from cdrl.config import DEFAULT_RECIPE, Config, config_path, load_config, recipe_names
from cdrl.training.guard import DivergenceError
from cdrl.training.loop import run
from cdrl.training.signals import TrainingStopped
from cdrl.utils import (
    OWNER_MARKER,
    UsageError,
)

FLAG_TO_KEY = {
    "output_dir": "log.output_dir",
    "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
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
    parser.add_argument(
        "--train_batch_size", help="batch size per process and micro-batch (train.batch_size)"
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        help="micro-batches per optimizer step (train.gradient_accumulation_steps; default 1); steps, "
        "checkpoints, EMA and the LR schedule count optimizer steps",
    )
    parser.add_argument("--max_train_steps", help="optimizer steps (train.max_steps)")
    parser.add_argument("--learning_rate", help="EBM learning rate (train.ebm_lr)")
    parser.add_argument("--mixed_precision", help="no | fp16 | bf16 (train.mixed_precision)")
    parser.add_argument("--checkpointing_steps", help="steps between resumable checkpoints")
    parser.add_argument("--checkpoints_total_limit", help="keep at most this many checkpoints")
    parser.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-N folder")
    parser.add_argument("--seed", help="training seed (train.seed)")
    parser.add_argument("--report_to", help="tensorboard | wandb | none (log.report_to)")
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="upload the exported pipeline to the Hugging Face Hub at the end (huggingface_hub)",
    )
    parser.add_argument(
        "--hub_model_id",
        help="the Hub repository (default: the output folder's name); needs --push_to_hub",
    )
    parser.add_argument(
        "--hub_token",
        help="a Hub token (default: the one `hf auth login` stored); needs --push_to_hub",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    for flag in ("hub_model_id", "hub_token"):
        if getattr(args, flag) is not None and not args.push_to_hub:
            raise CLIError(f"--{flag} needs --push_to_hub")
    overrides = list(args.set)
    overrides += [
        f"{key}={getattr(args, flag)}"
        for flag, key in FLAG_TO_KEY.items()
        if getattr(args, flag) is not None
    ]
    return load_config(config_path(args.config), overrides), args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code: 0, 2 for bad input or divergence (one ``error:`` line), or
    128 + the signal's number when SIGINT / SIGTERM stopped training after a checkpoint."""
    return run_cli(
        _main,
        argv,
        memory_hint="lower --train_batch_size or log.num_grid_samples, or narrow the networks",
        errors=(DivergenceError,),
        limit=1_000,  # a divergence names the run's checkpoints: paths can be long
    )


def _main(argv: Sequence[str] | None) -> int:
    cfg, args = parse_args(argv)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
        return 0
    if args.push_to_hub:
        check_hub(cfg, args)
    try:
        export_dir = run(cfg, resume=args.resume_from_checkpoint, command=command_line(argv))
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        return stopped.exit_code
    uploaded = None
    if args.push_to_hub:
        uploaded = push_to_hub(export_dir, hub_repo(cfg, args), args.hub_token)
    print(f"done: pipeline saved to {export_dir}")
    if uploaded:
        print(f"uploaded to https://huggingface.co/{uploaded}")
    return 0


def command_line(argv: Sequence[str] | None) -> str:
    """The command as typed, for the model card: the program's name and its arguments, shell-quoted."""
    if argv is None:
        return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return shlex.join(["cdrl-train", *map(str, argv)])


def hub_repo(cfg: Config, args: argparse.Namespace) -> str:
    """--hub_model_id, or the output folder's name (as diffusers' training examples)."""
    return args.hub_model_id or Path(cfg.log.output_dir).resolve().name


def check_hub(cfg: Config, args: argparse.Namespace) -> None:
    """Refuse --push_to_hub before training when the upload could not happen."""
    if importlib.util.find_spec("huggingface_hub") is None:
        raise CLIError(
            "--push_to_hub needs the huggingface_hub package: pip install huggingface_hub"
        )
    if args.hub_token is not None and cfg.log.report_to == "wandb":
        raise CLIError(
            "--hub_token with --report_to wandb would expose the token in the run's logged config; "
            "log in with `hf auth login` instead"
        )
    repo = hub_repo(cfg, args)
    if not repo.strip("/") or repo.count("/") > 1 or " " in repo:
        raise CLIError(f"--hub_model_id {repo!r} is not a Hub repository id (name or owner/name)")


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def push_to_hub(folder: Path, repo_id: str, token: str | None) -> str | None:
    """Upload the exported pipeline folder (model card included) to the Hub repository ``repo_id``, created
    if needed; main process only. Returns the repository's full id (None on other processes). A failure
    is a one-line UsageError: the export stays on disk."""
    if not is_main_process():
        return None
    import huggingface_hub

    try:
        repo_id = huggingface_hub.create_repo(repo_id, exist_ok=True, token=token).repo_id
        huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message="cdrl: end of training",
            token=token,
            ignore_patterns=[OWNER_MARKER],  # our bookkeeping, not the model's
        )
        return repo_id
    except (OSError, ValueError) as err:  # HfHubHTTPError is an OSError
        raise UsageError(
            f"--push_to_hub: the upload to {repo_id} failed ({' '.join(str(err).split())[:200]}); "
            f"the pipeline is saved in {folder}: upload it with `hf upload {repo_id} {folder}`"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
