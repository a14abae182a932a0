"""A kill at each step of checkpoint pruning (issue 20): after the rename of an old checkpoint to
``.del-checkpoint-N`` and in the middle of deleting it. Every ``checkpoint-N`` left is complete, and the
next start removes the remains and resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import cdrl.cli.train as cli_train
import cdrl.training.checkpoint as checkpoint_module
from cdrl.training.checkpoint import checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "--config",
    ROOT / "configs/debug.yaml",
    "--report_to",
    "none",
    "--max_train_steps",
    "8",
    "--set",
    "log.sample_every=0",
    "log.checkpointing_steps=2",
    "log.checkpoints_total_limit=1",
]


def train_pausing_in_pruning(argv: list[str]) -> int:
    """A ``fresh_process`` target: cdrl.cli.train.main(argv[1:]), except that deleting a pruned checkpoint
    (``.del-checkpoint-N``) stops for good: before any file is removed (argv[0] == "renamed") or after the
    first file (argv[0] == "half-deleted"). It says so on stdout and waits to be killed."""
    moment, rmtree = argv[0], checkpoint_module.shutil.rmtree

    def pausing_rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(".del-checkpoint-"):
            if moment == "half-deleted":
                next(p for p in sorted(path.iterdir()) if p.is_file()).unlink()
            print(f"paused deleting {path}", flush=True)
            time.sleep(600)
        return rmtree(path, *args, **kwargs)

    checkpoint_module.shutil.rmtree = pausing_rmtree
    return cli_train.main(argv[1:])


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["renamed", "half-deleted"])
def test_a_kill_while_pruning_leaves_complete_checkpoints_and_resumes(
    fresh_process, tmp_path, moment
):
    run = tmp_path / "run"
    io = tmp_path / "io-1"
    process = fresh_process.start(
        "test_kill_pruning:train_pausing_in_pruning", [moment, *RUN, "--output_dir", run], io
    )
    deadline = time.monotonic() + 120
    while not ((io / "out.txt").is_file() and "paused" in (io / "out.txt").read_text()):
        assert process.is_alive() and time.monotonic() < deadline, "never reached the pruning"
        time.sleep(0.005)
    process.kill()
    process.join()

    pruned = list(run.glob(".del-checkpoint-*"))
    assert len(pruned) == 1  # the kill landed inside the deletion of a pruned checkpoint
    kept = sorted(run.glob("checkpoint-*"))
    assert kept and all(checkpoint_problem(folder) is None for folder in kept)

    code, _, err = fresh_process.run(
        "cdrl.cli.train",
        [*RUN, "--output_dir", run, "--resume_from_checkpoint", "latest"],
        tmp_path / "io-2",
    )
    assert code == 0, err[-2000:]
    assert not list(run.glob(".*-checkpoint-*"))  # the remains were removed
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-8"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8
