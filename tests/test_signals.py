"""SIGINT and SIGTERM during training (issue 20): the step in progress finishes, a checkpoint is saved, one
line says where, the exit code is 128 + the signal's number, and a resume continues exactly."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from cdrl.training.checkpoint import checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "--config",
    ROOT / "configs/debug.yaml",
    "--report_to",
    "none",
    "--max_train_steps",
    "12",
    "--set",
    "log.sample_every=0",
    "log.log_every=1",
    "log.checkpointing_steps=100",
]
LOSS_KEYS = ("ebm/loss", "ebm/energy_gap", "init/mse")


def _records(run: Path) -> list[dict]:
    lines = []
    for line in (run / "metrics.jsonl").read_text().splitlines() if run.exists() else []:
        try:
            lines.append(json.loads(line))
        except ValueError:  # a line cut short
            pass
    return [r for r in lines if "event" not in r]


def _last_step(run: Path) -> int:
    if not (run / "metrics.jsonl").is_file():
        return 0
    return max((r["step"] for r in _records(run)), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_the_resume_continues_exactly(fresh_process, tmp_path, sig):
    reference = tmp_path / "reference"
    code, _, err = fresh_process.run(
        "cdrl.cli.train", [*RUN, "--output_dir", reference], tmp_path / "io-ref"
    )
    assert code == 0, err[-2000:]

    run = tmp_path / "run"
    process = fresh_process.start("cdrl.cli.train", [*RUN, "--output_dir", run], tmp_path / "io-1")
    deadline = time.monotonic() + 120
    while _last_step(run) < 3:
        assert process.is_alive() and time.monotonic() < deadline, "no progress before the signal"
        time.sleep(0.005)
    os.kill(process.pid, sig)
    process.join(120)
    assert process.exitcode == 128 + sig

    err = (tmp_path / "io-1" / "err.txt").read_text().splitlines()
    stopped = [line for line in err if line.startswith("stopped by")]
    assert len(stopped) == 1, err[-5:]
    assert not [line for line in err if line.startswith(("error:", "Traceback"))]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert 3 <= step < 12
    assert stopped[0] == (
        f"stopped by {sig.name} at step {step}: saved {run / f'checkpoint-{step}'}; continue with "
        "--resume_from_checkpoint latest"
    )
    assert checkpoint_problem(run / f"checkpoint-{step}") is None
    assert not (run / "pipeline").exists()  # an interrupted run exports nothing
    assert not list(run.glob(".*-checkpoint-*"))

    code, _, err = fresh_process.run(
        "cdrl.cli.train",
        [*RUN, "--output_dir", run, "--resume_from_checkpoint", "latest"],
        tmp_path / "io-2",
    )
    assert code == 0, err[-2000:]
    # bit-exact: same seed, one thread, same machine; the checkpoint restores every state bit for bit
    resumed, uninterrupted = _records(run), _records(reference)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == list(range(1, 13))
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}, a["step"]


def test_the_handlers_are_restored_after_training(tmp_path):
    from conftest import train_debug

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert train_debug(tmp_path / "run", "--set", "log.sample_every=0") == 0
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before
