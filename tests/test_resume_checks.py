"""Resuming into something else is refused (issue 20, class 10), and a checkpoint's state files are
checked before use (class 3): one `error:` line, exit code 2, and the run folder exactly as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.utils import load as accelerate_load
from conftest import train_debug

from cdrl.training.checkpoint import checkpoint_problem, marker_problem, resume_mismatch

NO_GRIDS = "log.sample_every=0"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """configs/debug.yaml trained 0 -> 4 (checkpoints 2 and 4, no grids)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    assert train_debug(out, "--set", NO_GRIDS) == 0
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".cdrl-run.lock"
    }


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "override, named",
    [
        ("schedule.num_levels=3", "schedule.num_levels is 3 now but the run was trained with 6"),
        ("ebm.base_channels=16", "ebm.base_channels is 16 now"),
        ("initializer.arch=none", "initializer.arch is 'none' now"),
        ("data.scale=2.0", "data.scale is 2.0 now"),
        ("schedule.logsnr_max=9.0", "schedule.logsnr_max is 9.0 now"),
    ],
)
def test_a_resume_that_would_build_another_model_is_refused(run, tmp_path, capsys, override, named):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = _snapshot(out)
    code = train_debug(out, "--resume_from_checkpoint", "latest", "--set", NO_GRIDS, override)
    assert code == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and named in errors[0], errors
    assert "resume with the run's settings" in errors[0]
    assert _snapshot(out) == before  # metrics, config.yaml, checkpoints, export: untouched


def test_a_resume_may_change_what_does_not_shape_the_model(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    assert (
        train_debug(
            out,
            "--resume_from_checkpoint",
            "latest",
            "--max_train_steps",
            "5",
            "--set",
            NO_GRIDS,
            "train.ebm_lr=1e-5",
        )
        == 0
    )


def test_resume_mismatch_compares_every_shaping_key():
    current = {
        "schedule": {"num_levels": 2},
        "ebm": {"arch": "resnet"},
        "initializer": {"arch": "unet"},
        "data": {
            "name": "digits",
            "image_size": None,
            "channels": None,
            "scale": 1.0,
            "class_conditional": False,
            "attributes": [],
        },
    }
    assert resume_mismatch(json.loads(json.dumps(current)), current) is None
    changed = json.loads(json.dumps(current))
    changed["data"]["attributes"] = ["thickness"]
    assert "data.attributes" in resume_mismatch(changed, current)


def _tamper(out: Path, edit) -> None:
    marker = out / "checkpoint-4" / "checkpoint.json"
    info = json.loads(marker.read_text())
    edit(info)
    marker.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            lambda i: i["guard"].update(rollbacks=10**15),
            "guard.rollbacks = 1000000000000000, not a count",
        ),
        (lambda i: i["guard"].update(skipped=-1), "guard.skipped = -1, not a count"),
        (lambda i: i.update(step=40), "says step 40, not the step in its name"),
        (lambda i: i["ema"]["ebm"].update(decay=5.0), "ema.ebm.decay = 5.0, not in [0, 1]"),
        (lambda i: i["ema"]["ebm"].update(decay=float("nan")), "ema.ebm.decay = nan"),
        (lambda i: i["guard"].update(lies=1), "unknown guard counters"),
        (lambda i: i["files"].update({"../../x": 1}), "lists its files wrongly"),
    ],
)
def test_a_checkpoint_json_that_lies_is_refused_before_use(run, tmp_path, capsys, edit, named):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    _tamper(out, edit)
    assert named in checkpoint_problem(out / "checkpoint-4")
    before = _snapshot(out)
    code = train_debug(
        out, "--resume_from_checkpoint", str(out / "checkpoint-4"), "--set", NO_GRIDS
    )
    assert code == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and named in errors[0], errors
    assert _snapshot(out) == before


def test_latest_passes_over_a_lying_checkpoint_to_the_previous_one(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    _tamper(out, lambda i: i["guard"].update(rollbacks=10**15))
    assert train_debug(out, "--resume_from_checkpoint", "latest", "--set", NO_GRIDS) == 0
    assert f"warning: skipping {out / 'checkpoint-4'}" in capsys.readouterr().err


def test_an_rng_state_of_the_wrong_shape_is_refused_with_one_line(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoint-2")
    file = out / "checkpoint-4" / "random_states_0.pkl"
    states = accelerate_load(file, map_location="cpu", weights_only=True)
    states["torch_manual_seed"] = torch.zeros(3, dtype=torch.uint8)  # plain data, wrong shape
    torch.save(states, file)
    _tamper(out, lambda i: i["files"].update({file.name: file.stat().st_size}))
    code = train_debug(out, "--resume_from_checkpoint", "latest", "--set", NO_GRIDS)
    assert code == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith(
        f"error: checkpoint {out / 'checkpoint-4'} cannot be loaded"
    )


def test_marker_problem_accepts_what_save_checkpoint_writes(run):
    for folder in sorted(run.glob("checkpoint-*")):
        assert marker_problem(json.loads((folder / "checkpoint.json").read_text()), folder) is None
