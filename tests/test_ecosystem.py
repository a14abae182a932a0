"""Conventions users bring from diffusers and accelerate: recipes by name from any folder, the launcher's
mixed precision, trackers that exist or a one-line refusal, training curves in every run folder."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import reset_accelerate

from cdrl.cli import curves as curves_cli
from cdrl.cli.train import main, parse_args
from cdrl.config import CONFIGS_DIR, ConfigError, config_path, recipe_names
from cdrl.training import curves

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "log.num_grid_samples=4",
    "langevin.sample_steps=1",
    "log.log_every=1",
    "log.sample_every=0",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def test_recipes_are_packaged_and_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert {"digits", "digits_cond", "cifar10", "debug"} <= set(recipe_names())
    assert config_path("digits") == CONFIGS_DIR / "digits.yaml"
    assert config_path("digits_cond.yaml") == CONFIGS_DIR / "digits_cond.yaml"
    mine = tmp_path / "digits.yaml"  # a file of the user's wins over the recipe of the same name
    mine.write_text("train: {batch_size: 8}\n")
    assert config_path("digits.yaml") == Path("digits.yaml")
    with pytest.raises(ConfigError, match="neither a file nor a packaged recipe: cifar10"):
        config_path("digts")
    # The repository's configs/ is the packaged folder (a link), so both spellings give one file.
    assert (ROOT / "configs/digits.yaml").resolve() == (CONFIGS_DIR / "digits.yaml").resolve()


def test_no_config_means_the_digits_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = parse_args([])
    expected, _ = parse_args(["--config", str(CONFIGS_DIR / "digits.yaml")])
    assert cfg == expected and cfg.data.name == "digits"


def test_train_by_recipe_name_from_an_empty_folder_writes_curves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [
        "--config",
        "digits",
        "--max_train_steps",
        "2",
        "--output_dir",
        "x",
        "--report_to",
        "none",
    ]
    assert main([*argv, "--set", *FAST]) == 0
    run = tmp_path / "x"
    assert (run / "pipeline/model_index.json").is_file()
    png = (run / curves.CURVES_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # cdrl-curves redraws it for any run folder; a folder that is not a run is one line, exit 2.
    assert curves_cli.main([str(run), "--output", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes().startswith(b"\x89PNG")
    assert curves_cli.main([str(tmp_path)]) == 2


def test_curves_skip_guard_events_and_a_line_cut_short(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        '{"step": 1, "ebm/loss": 0.5, "level0/gap": 0.1}\n{"event": "rollback", "step": 1}\n'
        '{"step": 2, "ebm/loss": 0.25, "level0/gap": 0.2}\n{"step": 3, "ebm/lo'
    )
    assert [r["step"] for r in curves.read_metrics(metrics)] == [1, 2]
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"event": "rollback", "step": 0}\n')
    with pytest.raises(ValueError, match="no step records"):
        curves.plot_curves(empty, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("tracker", ["wandb", "comet"])
def test_a_tracker_that_cannot_run_is_refused_before_anything_is_written(tmp_path, capsys, tracker):
    # wandb is an optional extra (not installed by make install); comet is not a tracker cdrl knows.
    if tracker == "wandb" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    argv = ["--config", "debug", "--output_dir", str(tmp_path / "run"), "--report_to", tracker]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: log.report_to=")
    assert not (tmp_path / "run").exists()


def test_tensorboard_is_in_the_default_install():
    assert importlib.util.find_spec("tensorboard") is not None


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_reaches_the_run(tmp_path):
    """`accelerate launch --mixed_precision bf16` is honoured (the config's "auto" defers to it) and
    recorded in the run's config.yaml; an explicit --mixed_precision to train.py still wins."""
    from accelerate.utils import write_basic_config

    config_file = tmp_path / "accel.json"
    write_basic_config(mixed_precision="no", save_location=str(config_file))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["PYTHONPATH"] = str(ROOT)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--cpu",
        "--num_processes",
        "1",
        "--mixed_precision",
        "bf16",
        str(ROOT / "train.py"),
        "--config",
        "debug",
        "--report_to",
        "none",
        "--max_train_steps",
        "1",
        "--set",
        "log.sample_every=0",
        "log.num_grid_samples=1",
    ]
    run = tmp_path / "run"
    proc = subprocess.run(
        [*launch, "--output_dir", str(run)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"


@pytest.mark.parametrize(("flag", "expected"), [(None, "bf16"), ("no", "no")])
def test_the_launchers_precision_is_the_default_and_a_flag_overrides_it(
    tmp_path, monkeypatch, flag, expected
):
    # What `accelerate launch --mixed_precision bf16` (or `accelerate config`) hands the process.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    argv = [
        "--config",
        "debug",
        "--output_dir",
        str(tmp_path / "run"),
        "--report_to",
        "none",
        "--max_train_steps",
        "1",
        "--set",
        "log.sample_every=0",
        "log.num_grid_samples=1",
    ]
    if flag is not None:
        argv += ["--mixed_precision", flag]
    assert main(argv) == 0
    config = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert config["train"]["mixed_precision"] == expected
