"""Reliability (issue 8): the divergence guard under injected NaNs, crash-safe checkpoints under SIGKILL,
safe loading of pipelines and checkpoints, and determinism.

In-process runs use configs/debug.yaml (a few seconds each). The SIGKILL test runs training in fresh
processes forked from a server that imported cdrl once (the ``fresh_process`` fixture of conftest.py).
The table of bad inputs of every CLI is in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from conftest import reset_accelerate, train_debug
from safetensors.torch import load_file

import cdrl.cli.train as cli_train
import cdrl.training.checkpoint as checkpoint_module
import cdrl.training.loop as loop
from cdrl.cli import generate
from cdrl.config import load_config
from cdrl.models import build_models
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.training.checkpoint import checkpoint_problem
from cdrl.training.step import Models, lr_schedule, train_step
from cdrl.utils import RUN_LOCK

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs/debug.yaml"
NO_GRIDS = "log.sample_every=0"  # grids cost time and are not what these tests look at
LOSS_KEYS = ("ebm/loss", "ebm/energy_gap", "init/mse", "ebm/grad_norm", "init/grad_norm")


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def _lines(output_dir: Path) -> list[dict]:
    """Every readable line of metrics.jsonl (a kill can cut the last one short)."""
    lines = []
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def _records(output_dir: Path) -> list[dict]:
    return [line for line in _lines(output_dir) if "event" not in line]


def _events(output_dir: Path) -> list[dict]:
    return [line for line in _lines(output_dir) if "event" in line]


def _marker(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "checkpoint.json").read_text())


def _adam_steps(checkpoint: Path, index: int = 0) -> int:
    """The step count of the EBM's (index 0) or the initializer's (1) Adam state in a checkpoint."""
    name = "optimizer.bin" if index == 0 else f"optimizer_{index}.bin"
    state = torch.load(checkpoint / name, map_location="cpu", weights_only=True)["state"]
    return int(state[0]["step"])


@pytest.fixture
def poison(monkeypatch) -> Callable[[Callable[[int], bool]], list[int]]:
    """``poison(bad)``: from now on train_step sees an all-NaN batch at every call k with bad(k) true.

    Calls count from 1 and include the steps replayed after a rollback. Returns the list of calls made.
    """

    def install(bad: Callable[[int], bool]) -> list[int]:
        calls: list[int] = []
        clean_step = loop.train_step

        def poisoned(models, batch, cfg, schedule, accelerator, condition_sizes=()):
            calls.append(len(calls) + 1)
            x0, cond = batch
            if bad(calls[-1]):
                x0 = torch.full_like(x0, float("nan"))
            return clean_step(models, (x0, cond), cfg, schedule, accelerator, condition_sizes)

        monkeypatch.setattr(loop, "train_step", poisoned)
        return calls

    return install


# ----------------------------------------------------------------------------------------------------------
# The divergence guard in train_step: a refused step changes nothing.


def _setup(*overrides: str):
    """configs/debug.yaml models, prepared as run() prepares them (warmup 0: the first step moves)."""
    cfg = load_config(DEBUG, ["train.warmup_steps=0", *overrides])
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    ebm, init = build_models(cfg, (1, 8, 8), ())
    ebm_opt = torch.optim.Adam(ebm.parameters(), lr=cfg.train.ebm_lr)
    init_opt = torch.optim.AdamW(init.parameters(), lr=cfg.train.init_lr)
    ebm_sched = lr_schedule("constant", ebm_opt, 0, 10)
    init_sched = lr_schedule("constant", init_opt, 0, 10)
    models = Models(*accelerator.prepare(ebm, init, ebm_opt, init_opt, ebm_sched, init_sched))
    schedule = CDRLScheduler.from_training_config(cfg).schedule
    batch = (torch.rand(16, 1, 8, 8) * 2 - 1, torch.zeros(16, 0, dtype=torch.long))
    return cfg, accelerator, models, schedule, batch


def _state(models: Models) -> dict:
    """Everything an update would change: parameters, optimizer states, scheduler positions."""
    return {
        "ebm": {k: v.detach().clone() for k, v in models.ebm.state_dict().items()},
        "init": {k: v.detach().clone() for k, v in models.initializer.state_dict().items()},
        "ebm_opt": len(models.ebm_opt.state),
        "init_opt": len(models.init_opt.state),
        "scheds": (models.ebm_sched.scheduler.last_epoch, models.init_sched.scheduler.last_epoch),
    }


def _same_parameters(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    # bit-exact: a refused step must not touch a single bit of a parameter
    return all(torch.equal(before[name], p) for name, p in module.named_parameters())


def test_nan_batch_is_refused_and_changes_nothing_then_a_clean_batch_trains():
    cfg, accelerator, models, schedule, (x0, cond) = _setup()
    before = _state(models)
    nan_batch = (torch.full_like(x0, float("nan")), cond)
    stats, problem = train_step(models, nan_batch, cfg, schedule, accelerator)
    assert problem is not None and problem.startswith("non-finite EBM energies"), problem
    assert "non-finite EBM loss" in problem and "E(y+) mean nan" in problem
    assert _same_parameters(before["ebm"], models.ebm)
    assert _same_parameters(before["init"], models.initializer)
    after = _state(models)
    assert (after["ebm_opt"], after["init_opt"], after["scheds"]) == (0, 0, (0, 0))
    assert all(p.grad is None for p in models.ebm.parameters())

    stats, problem = train_step(models, (x0, cond), cfg, schedule, accelerator)
    assert problem is None
    assert not _same_parameters(before["ebm"], models.ebm)
    assert models.ebm_sched.scheduler.last_epoch == 1 and len(models.ebm_opt.state) > 0
    assert math.isfinite(stats["ebm/loss"].item())


def test_non_finite_ebm_gradients_are_refused_before_any_update():
    cfg, accelerator, models, schedule, batch = _setup()
    before = _state(models)
    param = next(models.ebm.parameters())
    handle = param.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    try:
        _, problem = train_step(models, batch, cfg, schedule, accelerator)
    finally:
        handle.remove()
    assert problem is not None and problem.startswith("non-finite EBM gradients"), problem
    assert _same_parameters(before["ebm"], models.ebm)
    assert _same_parameters(before["init"], models.initializer)
    assert _state(models)["scheds"] == (0, 0)


def test_non_finite_initializer_gradients_skip_the_initializer_update():
    cfg, accelerator, models, schedule, batch = _setup()
    before = _state(models)
    param = next(p for p in models.initializer.parameters() if p.requires_grad)
    handle = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        _, problem = train_step(models, batch, cfg, schedule, accelerator)
    finally:
        handle.remove()
    assert problem is not None and "non-finite initializer gradients" in problem
    assert "only the EBM's update was applied" in problem
    assert _same_parameters(before["init"], models.initializer)
    assert len(models.init_opt.state) == 0 and models.init_sched.scheduler.last_epoch == 0
    assert not _same_parameters(before["ebm"], models.ebm)  # the EBM's half had been applied


def test_an_energy_gap_beyond_the_bound_is_refused():
    cfg, accelerator, models, schedule, batch = _setup("guard.max_energy_gap=1e-12")
    before = _state(models)
    _, problem = train_step(models, batch, cfg, schedule, accelerator)
    assert problem is not None and "energy gap beyond guard.max_energy_gap=1e-12" in problem
    assert "non-finite" not in problem
    assert _same_parameters(before["ebm"], models.ebm)


# ----------------------------------------------------------------------------------------------------------
# The divergence guard in a run: skip, count, log; roll back; stop.


def test_a_nan_step_is_skipped_counted_and_logged(tmp_path, poison, capsys):
    out = tmp_path / "run"
    poison(lambda call: call == 3)
    assert train_debug(out, "--max_train_steps", "6", "--set", NO_GRIDS) == 0
    err = capsys.readouterr().err
    assert "warning: step 3 skipped (1 in a row): non-finite EBM energies" in err

    (event,) = _events(out)
    assert event["step"] == 3 and event["event"] == "skipped" and event["guard/skipped"] == 1
    assert event["reason"].startswith("non-finite EBM energies")
    records = {r["step"]: r for r in _records(out)}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert "ebm/loss" not in records[3] and records[3]["guard/skipped"] == 1  # no loss to average
    assert all(math.isfinite(records[s][key]) for s in (1, 2, 4, 5, 6) for key in LOSS_KEYS)
    assert records[6]["guard/skipped"] == 1 and records[6]["guard/rollbacks"] == 0

    # No update was applied at step 3: 5 Adam steps for 6 training steps, and 5 EMA updates.
    final = out / "checkpoint-6"
    assert _adam_steps(final, 0) == 5 and _adam_steps(final, 1) == 5
    marker = _marker(final)
    assert marker["ema"]["ebm"]["optimization_step"] == 5
    assert marker["guard"] == {"skipped": 1, "streak": 0, "rollbacks": 0}
    pipe = CDRLPipeline.from_pretrained(out / "pipeline")
    assert all(torch.isfinite(p).all() for p in pipe.ebm.parameters())


def test_a_streak_of_nan_steps_rolls_back_with_lower_learning_rates(tmp_path, poison, capsys):
    out = tmp_path / "run"
    args = [
        "--set",
        NO_GRIDS,
        "train.warmup_steps=0",
        "guard.max_bad_steps=2",
        "guard.lr_factor=0.5",
    ]
    calls = poison(lambda call: call in (5, 6))
    assert train_debug(out, "--max_train_steps", "8", *args) == 0
    assert len(calls) == 10  # steps 1-6, then 5-8 again after rolling back to checkpoint-4
    err = capsys.readouterr().err
    assert (
        "rolled back to checkpoint-4, learning rates scaled by 0.5 (rollback 1 of at most 3)" in err
    )

    events = _events(out)
    assert [(e["event"], e["step"]) for e in events] == [
        ("skipped", 5),
        ("skipped", 6),
        ("rollback", 6),
    ]
    rollback = events[-1]
    assert rollback["to_step"] == 4 and rollback["lr/ebm"] == pytest.approx(0.5e-4)
    lines = _lines(out)
    cut = lines.index(rollback)
    before = [r for r in lines[:cut] if "event" not in r]
    after = [r for r in lines[cut:] if "event" not in r]
    assert [r["step"] for r in after] == [5, 6, 7, 8]
    assert all(r["lr/ebm"] == pytest.approx(1e-4) for r in before if r["step"] <= 4)
    assert all(r["lr/ebm"] == pytest.approx(0.5e-4) for r in after)
    assert all(math.isfinite(r["ebm/loss"]) for r in after)
    assert _marker(out / "checkpoint-8")["guard"] == {"skipped": 2, "streak": 0, "rollbacks": 1}

    # The lowered rate is part of the run: a resume keeps it.
    assert (
        train_debug(out, "--resume_from_checkpoint", "latest", "--max_train_steps", "9", *args) == 0
    )
    last = _records(out)[-1]
    assert last["step"] == 9 and last["lr/ebm"] == pytest.approx(0.5e-4)
    assert last["guard/rollbacks"] == 1


def test_training_stops_with_one_line_when_rollbacks_do_not_help(tmp_path, poison, capsys):
    out = tmp_path / "run"
    poison(lambda call: call >= 3)
    args = ["--set", NO_GRIDS, "guard.max_bad_steps=2", "guard.max_rollbacks=1"]
    assert train_debug(out, "--max_train_steps", "8", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert errors == [err[-1]], err
    message = errors[0]
    assert message.startswith("error: training diverged: 2 bad steps in a row up to step 4")
    assert "after 1 rollback(s) with the learning rates scaled by 0.5" in message
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in message
    events = [(e["event"], e["step"]) for e in _events(out)]
    assert events == [
        ("skipped", 3),
        ("skipped", 4),
        ("rollback", 4),
        ("skipped", 3),
        ("skipped", 4),
        ("stopped", 4),
    ]
    assert checkpoint_problem(out / "checkpoint-2") is None
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_run_ending_in_a_bad_streak_exports_nothing_and_exits_2(tmp_path, poison, capsys):
    # A good export first (0 -> 4); then a resume whose last two steps (7, 8) are bad: below
    # guard.max_bad_steps, so no rollback, and the run would otherwise end "done" and export.
    out = tmp_path / "run"
    args = ["--set", NO_GRIDS, "guard.max_bad_steps=5"]
    assert train_debug(out, "--max_train_steps", "4", *args) == 0
    exported = {p: p.read_bytes() for p in sorted((out / "pipeline").rglob("*")) if p.is_file()}
    capsys.readouterr()
    poison(lambda call: call >= 3)  # calls 1-4 of the resume are steps 5-8
    resume = ["--resume_from_checkpoint", "latest", "--max_train_steps", "8"]
    assert train_debug(out, *resume, *args) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: training ended with 2 bad steps in a row up to step 8")
    assert f"the last good checkpoint is {out / 'checkpoint-6'}" in message
    assert {p: p.read_bytes() for p in exported} == exported  # the good export is untouched
    assert not (out / "checkpoint-8").exists()  # no checkpoint of the diverging state


def test_a_streak_before_the_first_checkpoint_stops_with_one_line(tmp_path, poison, capsys):
    out = tmp_path / "run"
    poison(lambda call: True)
    assert (
        train_debug(out, "--max_train_steps", "8", "--set", NO_GRIDS, "guard.max_bad_steps=2") == 2
    )
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: training diverged: 2 bad steps in a row up to step 2")
    assert "no checkpoint to roll back to yet" in message


def test_with_the_guard_off_the_first_nan_step_stops_training(tmp_path, poison, capsys):
    out = tmp_path / "run"
    poison(lambda call: call == 3)
    assert train_debug(out, "--max_train_steps", "6", "--set", NO_GRIDS, "guard.enabled=false") == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: step 3: non-finite EBM energies")
    assert message.endswith("training stopped (guard.enabled=false)")
    assert _records(out)[-1]["step"] == 2


# ----------------------------------------------------------------------------------------------------------
# Crash-safe checkpoints: SIGKILL at random moments, then resume.

KILL_RUN = [
    "--config",
    DEBUG,
    "--report_to",
    "none",
    "--max_train_steps",
    "20",
    "--set",
    NO_GRIDS,
    "log.checkpointing_steps=2",
    "log.checkpoints_total_limit=2",
]


def _last_step(output_dir: Path) -> int:
    """The highest step in metrics.jsonl so far (0 before the first)."""
    if not (output_dir / "metrics.jsonl").is_file():
        return 0
    return max((line.get("step", 0) for line in _lines(output_dir)), default=0)


def train_pausing_in_a_checkpoint_write(argv: list[str]) -> int:
    """A ``fresh_process`` target: cdrl.cli.train.main(argv[1:]), except that the int(argv[0])-th file
    flush inside a .tmp-checkpoint-N folder never returns: the process says so on stdout and waits
    (to be killed) with that checkpoint half written."""
    pause_at, calls = int(argv[0]), []
    fsync = checkpoint_module.fsync_path

    def pausing_fsync(path: Path) -> None:
        if path.parent.name.startswith(".tmp-checkpoint-"):
            calls.append(path)
            if len(calls) == pause_at:
                print(f"paused writing {path}", flush=True)
                time.sleep(600)
        fsync(path)

    checkpoint_module.fsync_path = pausing_fsync
    return cli_train.main(argv[1:])


def _wait(condition: Callable[[], bool], process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.is_alive(), "the run finished before the moment chosen to kill it"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.001)


# Persistent chains at the two lowest levels, every negative there from a chain that never restarts:
# the chains are state a resume must restore from the checkpoint, or the losses differ.
PERSISTENT = [
    "train.persistent_levels=2",
    "train.persistent_fraction=1.0",
    "train.persistent_size=2",
    "train.persistent_reset=0.0",
]


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True], ids=["plain", "persistent-chains"])
def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(
    fresh_process, tmp_path, persistent
):
    kill_run = [*KILL_RUN, *(PERSISTENT if persistent else [])]  # more --set values
    reference = tmp_path / "reference"
    code, _, err = fresh_process.run(
        "cdrl.cli.train", [*kill_run, "--output_dir", reference], tmp_path / "io-reference"
    )
    assert code == 0, err[-3000:]

    # Three kills at moments drawn from a seeded generator: a few steps in (around the first
    # checkpoint), while a checkpoint is being written, and a few steps later; each resume starts from
    # the newest complete checkpoint. A write is too quick to hit by timing alone, so the second run
    # stops inside its first checkpoint write (at a file flush drawn from the generator) and is
    # killed there, a half-written .tmp-checkpoint-N on disk.
    out, rng, kills, mid_write = tmp_path / "run", random.Random(8), [], []
    for attempt, moment in enumerate(["steps", "checkpoint write", "steps"]):
        resume = ["--resume_from_checkpoint", "latest"] if attempt else []
        seen = _last_step(out)  # progress of the killed runs so far
        io = tmp_path / f"io-{attempt}"
        argv = [*kill_run, "--output_dir", out, *resume]
        if moment == "steps":
            process = fresh_process.start("cdrl.cli.train", argv, io)
            target = seen + rng.randint(2, 4)
            _wait(lambda target=target: _last_step(out) >= target, process)
            time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the next step
        else:
            target = "test_reliability:train_pausing_in_a_checkpoint_write"
            process = fresh_process.start(target, [rng.randint(1, 4), *argv], io)
            out_txt = io / "out.txt"
            _wait(
                lambda out_txt=out_txt: out_txt.is_file() and "paused" in out_txt.read_text(),
                process,
            )
        assert process.is_alive()
        process.kill()
        process.join()
        assert process.exitcode == -signal.SIGKILL
        # A temporary folder left behind: this kill landed while a checkpoint was being written (each
        # run writes a checkpoint before it is killed, and every write first deletes old leftovers).
        leftovers = list(out.glob(".tmp-checkpoint-*"))
        mid_write.append(bool(leftovers))
        kills.append(f"{moment}: killed at step {_last_step(out)}" + " (mid-write)" * mid_write[-1])
        if moment == "checkpoint write":
            assert leftovers, "the paused write left no temporary folder"
            assert all(not (p / "checkpoint.json").exists() for p in leftovers)  # unfinished
        # Whatever the moment, every checkpoint-N folder is complete (the previous ones intact).
        for folder in out.glob("checkpoint-*"):
            assert checkpoint_problem(folder) is None, (attempt, folder, checkpoint_problem(folder))
    assert any(mid_write), kills
    assert _last_step(out) < 20

    code, _, err = fresh_process.run(
        "cdrl.cli.train",
        [*kill_run, "--output_dir", out, "--resume_from_checkpoint", "latest"],
        tmp_path / "io-final",
    )
    assert code == 0, err[-3000:]

    # The same step count, and the same losses at every step as the uninterrupted run. Bit-exact: the
    # same seed, one thread, on the same machine; a resume restores the weights, optimizer and RNG
    # states bit for bit (safetensors and pickled tensors), so every step repeats the same operations.
    resumed, uninterrupted = _records(out), _records(reference)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == list(range(1, 21))
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}, a["step"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-18", "checkpoint-20"]
    if persistent:  # the chains fed the EBM and were in every checkpoint the resumes read
        assert max(r["persistent/share"] for r in resumed) > 0
        assert (out / "checkpoint-20" / "persistent_chains_0.safetensors").is_file()
    assert not list(out.glob(".*-checkpoint-*"))  # the killed runs' temporaries were cleaned up
    print("; ".join(kills))  # pytest -rP shows where the kills landed
    for part in ("ebm", "initializer"):
        file = f"pipeline/{part}/diffusion_pytorch_model.safetensors"
        a, b = load_file(str(reference / file)), load_file(str(out / file))
        assert all(torch.equal(a[k], b[k]) for k in a), part  # bit-exact, as the losses above


# ----------------------------------------------------------------------------------------------------------
# Incomplete checkpoints, safe loading.


@pytest.fixture(scope="module")
def run_0_to_4(tmp_path_factory) -> Path:
    """configs/debug.yaml trained 0 -> 4 in one go (seed 0, checkpoints 2 and 4, no grids)."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert train_debug(out, "--set", NO_GRIDS) == 0
    return out


def _losses(output_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: r[k] for k in LOSS_KEYS} for r in _records(output_dir)}


def test_latest_skips_an_incomplete_checkpoint_with_a_warning(run_0_to_4, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_0_to_4, out)
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # as if the disk had filled up
    assert train_debug(out, "--resume_from_checkpoint", "latest", "--set", NO_GRIDS) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: skipping {out / 'checkpoint-4'}: its file model.safetensors is missing or truncated"
        in err
    )
    # bit-exact: resuming is exact (README), same seed and process; checkpoints restore every bit
    assert _losses(out) == _losses(run_0_to_4)  # resumed at 2, trained 3 and 4 again, identically
    assert checkpoint_problem(out / "checkpoint-4") is None


class _Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("file", ["optimizer.bin", "random_states_0.pkl"])
def test_resume_refuses_a_pickle_that_is_not_plain_data(run_0_to_4, tmp_path, capsys, file):
    out = tmp_path / "run"
    shutil.copytree(run_0_to_4, out)
    marker = tmp_path / "executed"
    torch.save(_Payload(marker), out / "checkpoint-4" / file)
    shutil.rmtree(out / "checkpoint-2")  # so that 'latest' has only the tampered checkpoint
    # keep checkpoint.json's sizes true: the content lies
    info = _marker(out / "checkpoint-4")
    info["files"][file] = (out / "checkpoint-4" / file).stat().st_size
    (out / "checkpoint-4" / "checkpoint.json").write_text(json.dumps(info))
    assert train_debug(out, "--resume_from_checkpoint", "latest") == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"error: checkpoint file {out / 'checkpoint-4' / file} was refused")
    assert "(torch.load(weights_only=True): Unsupported global: GLOBAL io.open)" in message
    assert not marker.exists()


def test_pipeline_with_pickle_weights_is_refused_unopened(tiny_pipeline, tmp_path, capsys):
    folder = tmp_path / "pipeline"
    tiny_pipeline.save_pretrained(folder)
    (folder / "ebm" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "executed"
    torch.save(_Payload(marker), folder / "ebm" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="holds pickle weights .* safetensors only"):
        CDRLPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="use_safetensors=False is refused"):
        CDRLPipeline.from_pretrained(folder, use_safetensors=False)
    code = generate.main(["--checkpoint", str(folder), "--output", str(tmp_path / "g.png")])
    assert code == 2 and "pickle weights" in capsys.readouterr().err
    assert not marker.exists()


def test_pipeline_weights_must_match_their_config(tiny_pipeline, tmp_path):
    folder = tmp_path / "pipeline"
    tiny_pipeline.save_pretrained(folder)
    config_path = folder / "initializer" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [16]  # fewer blocks: the weights hold tensors the network lacks
    config["attention_levels"] = [False]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"initializer/config.json does not match its weights"):
        CDRLPipeline.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------
# Determinism: the same seed on the same machine gives the same losses and samples.


def test_same_seed_same_losses_weights_and_samples(run_0_to_4, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert train_debug(again, "--set", NO_GRIDS) == 0
    assert train_debug(other, "--seed", "1", "--set", NO_GRIDS) == 0
    assert _losses(again) == _losses(run_0_to_4)  # bit-exact: same seed, same process and threads
    assert _losses(other) != _losses(run_0_to_4)  # the seed matters: the comparison can fail
    samples = []
    for run in (run_0_to_4, again):
        pipe = CDRLPipeline.from_pretrained(run / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(5)
        samples.append(pipe(batch_size=4, generator=generator, output_type="pt").images)
    # bit-exact: bitwise-equal weights, the same seed and batch, in one process
    assert torch.equal(samples[0], samples[1])
    assert not torch.equal(samples[0][0], samples[0][1])


def test_generate_cli_is_deterministic(tiny_pipeline, tmp_path, capsys):
    folder = tmp_path / "pipeline"
    tiny_pipeline.save_pretrained(folder)
    outputs = []
    for name in ("a", "b"):
        argv = ["--checkpoint", str(folder), "--num_samples", "4", "--seed", "3"]
        assert generate.main([*argv, "--output", str(tmp_path / name), "--device", "cpu"]) == 0
        outputs.append([p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))])
    capsys.readouterr()
    # bit-exact PNG bytes: the same checkpoint, seeds, batch and process
    assert len(outputs[0]) == 4 and outputs[0] == outputs[1]
    assert len(set(outputs[0])) == 4  # four different samples (seeds 3, 4, 5, 6)


@pytest.mark.slow
def test_a_second_process_training_into_a_locked_run_is_refused(fresh_process, tmp_path):
    """Two processes: one trains into the folder (holding its lock); a second one, resuming into the
    same folder, is refused in one line naming the holder, and changes nothing there."""
    out = tmp_path / "run"
    argv = [*KILL_RUN, "--output_dir", out]
    first = fresh_process.start("cdrl.cli.train", argv, tmp_path / "io-first")
    try:
        _wait(lambda: _last_step(out) >= 1, first)
        lock = out / RUN_LOCK
        assert f"process {first.pid} on " in lock.read_text()
        code, _, err = fresh_process.run(
            "cdrl.cli.train", [*argv, "--resume_from_checkpoint", "latest"], tmp_path / "io-second"
        )
        assert first.is_alive()  # refused while the first one still trains
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, err[-3000:]
        assert errors[0].startswith(f"error: {out} is in use: process {first.pid} on ")
    finally:
        first.kill()
        first.join()
    # Killed, its lock is gone with it: the run resumes.
    code, _, err = fresh_process.run(
        "cdrl.cli.train", [*argv, "--resume_from_checkpoint", "latest"], tmp_path / "io-third"
    )
    assert code == 0, err[-3000:]
