"""The training side of issue 18: the model card of a run's export (step, command, figures), cdrl-export on
any checkpoint of a run (the run untouched), --push_to_hub up to the network boundary, sample grids in
tensorboard, the data prepared under accelerate's main_process_first, learning-rate rescaling through
a rebuilt scheduler. Bad input of the new flags is in tests/test_bad_inputs.py's table."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import huggingface_hub
import pytest
import torch
from accelerate import Accelerator
from conftest import reset_accelerate
from safetensors.torch import load_file

from cdrl.cli import export as export_cli
from cdrl.cli import train as train_cli
from cdrl.config import load_config
from cdrl.pipeline import CDRLPipeline
from cdrl.training import loop
from cdrl.training.state import scale_learning_rates
from cdrl.training.step import TrainState, lr_schedule

FAST = ["log.sample_every=0", "log.num_grid_samples=4"]


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def _train(*argv: str) -> int:
    reset_accelerate()
    try:
        return train_cli.main([str(a) for a in argv])
    finally:
        reset_accelerate()


def _snapshot(folder: Path) -> dict[str, tuple[int, int] | None]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        if p.is_file()
        else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def run_x(tmp_path_factory) -> Path:
    """From an empty folder: ``cdrl-train --config debug --max_train_steps 5 --output_dir x``."""
    root = tmp_path_factory.mktemp("empty")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        argv = ["--config", "debug", "--max_train_steps", "5", "--output_dir", "x"]
        assert _train(*argv, "--report_to", "none", "--set", "log.sample_every=0") == 0
    return root / "x"


def test_the_runs_export_carries_the_step_command_and_last_logged_figures(run_x):
    card = (run_x / "pipeline" / "README.md").read_text()
    assert "- training: 5 optimizer steps" in card
    assert (
        "- command: `cdrl-train --config debug --max_train_steps 5 --output_dir x --report_to none "
        "--set log.sample_every=0`" in card
    )
    last = [line for line in (run_x / "metrics.jsonl").read_text().splitlines() if line][-1]
    assert '"step": 5' in last
    for key in ("ebm/loss", "ebm/energy_gap", "init/mse", "ebm/grad_norm", "guard/skipped"):
        assert f"| {key} |" in card, key
    assert "level0/gap" not in card and "lr/ebm" not in card and "time/" not in card


def test_cdrl_export_writes_a_loadable_pipeline_and_leaves_the_run_alone(run_x, tmp_path, capsys):
    before = _snapshot(run_x)
    out = tmp_path / "export5"
    assert export_cli.main(["--checkpoint", str(run_x / "checkpoint-5"), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"exported step 5 of {run_x} to {out}"
    assert _snapshot(run_x) == before, "cdrl-export changed the run"
    card = (out / "README.md").read_text()
    assert "- training: 5 optimizer steps" in card and "| ebm/loss |" in card
    assert (
        "- command: `cdrl-train --config debug --max_train_steps 5 --output_dir x" in card
    )  # command.txt
    # The final checkpoint's export is the run's own export, bit for bit.
    for part in ("ebm", "initializer"):
        ours = load_file(out / part / "diffusion_pytorch_model.safetensors")
        runs = load_file(run_x / "pipeline" / part / "diffusion_pytorch_model.safetensors")
        assert ours.keys() == runs.keys() and all(torch.equal(ours[k], runs[k]) for k in ours)
    pipe = CDRLPipeline.from_pretrained(out)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()

    # An earlier step: other weights, its own step and figures; exporting again replaces the folder.
    assert export_cli.main(["--checkpoint", str(run_x / "checkpoint-4"), "--output", str(out)]) == 0
    assert "- training: 4 optimizer steps" in (out / "README.md").read_text()
    ebm4 = load_file(out / "ebm" / "diffusion_pytorch_model.safetensors")
    ebm5 = load_file(run_x / "pipeline" / "ebm" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(ebm4[k], ebm5[k]) for k in ebm4)
    assert _snapshot(run_x) == before


# ----------------------------------------------------------------------------------------------------------
# --push_to_hub, up to the network boundary.


@pytest.fixture
def hub(monkeypatch) -> list[tuple[str, dict]]:
    calls: list[tuple[str, dict]] = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        full = (
            repo_id if "/" in repo_id else f"user/{repo_id}"
        )  # the Hub puts a bare name under the user
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(**kwargs):
        calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_exported_folder_to_the_repo(tmp_path, hub, capsys):
    out = tmp_path / "run"
    argv = [
        "--config",
        "debug",
        "--output_dir",
        out,
        "--report_to",
        "none",
        "--max_train_steps",
        "1",
    ]
    flags = ["--push_to_hub", "--hub_model_id", "me/cdrl-digits", "--hub_token", "hf_xyz"]
    assert _train(*argv, *flags, "--set", *FAST) == 0
    assert [name for name, _ in hub] == ["create_repo", "upload_folder"]
    assert hub[0][1] == {"repo_id": "me/cdrl-digits", "exist_ok": True, "token": "hf_xyz"}
    upload = hub[1][1]
    assert upload["repo_id"] == "me/cdrl-digits" and upload["token"] == "hf_xyz"
    assert Path(upload["folder_path"]) == out / "pipeline"
    assert (Path(upload["folder_path"]) / "README.md").is_file()
    assert ".cdrl-output" in upload["ignore_patterns"]
    assert "uploaded to https://huggingface.co/me/cdrl-digits" in capsys.readouterr().out


def test_push_to_hub_names_the_repo_after_the_output_folder(tmp_path, hub):
    argv = ["--config", "debug", "--output_dir", tmp_path / "my-run", "--report_to", "none"]
    assert _train(*argv, "--max_train_steps", "1", "--push_to_hub", "--set", *FAST) == 0
    assert hub[0][1]["repo_id"] == "my-run" and hub[0][1]["token"] is None
    assert hub[1][1]["repo_id"] == "user/my-run"  # as create_repo named it


def test_a_failed_upload_is_one_line_and_keeps_the_export(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    out = tmp_path / "run"
    argv = [
        "--config",
        "debug",
        "--output_dir",
        out,
        "--report_to",
        "none",
        "--max_train_steps",
        "1",
    ]
    assert _train(*argv, "--push_to_hub", "--set", *FAST) == 2
    # training's progress bar came before; the error is one line, the last
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: --push_to_hub: the upload to run failed")
    assert f"hf upload run {out / 'pipeline'}" in err[0]
    assert (out / "pipeline" / "model_index.json").is_file()


def test_push_to_hub_without_huggingface_hub_is_refused_before_training(
    tmp_path, monkeypatch, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "huggingface_hub" else real(name, *a),
    )
    out = tmp_path / "run"
    argv = ["--config", "debug", "--output_dir", out, "--report_to", "none", "--push_to_hub"]
    assert _train(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --push_to_hub needs the huggingface_hub package: pip install huggingface_hub"
    ]
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# Sample grids in the tracker; the data under main_process_first.


def test_sample_grids_reach_tensorboard_as_images_and_stay_pngs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["--config", "debug", "--output_dir", out, "--report_to", "tensorboard"]
    assert _train(*argv, "--max_train_steps", "2", "--set", "log.num_grid_samples=4") == 0
    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags = {}
    for file in events:
        accumulator = EventAccumulator(str(file), size_guidance={"images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["images"]:
            tags[tag] = [event.step for event in accumulator.Images(tag)]
    # debug.yaml: a grid every 2 steps, and the final one (the same step here)
    assert tags.keys() == {"samples/refined", "samples/init"}
    assert set(tags["samples/refined"]) == {2}
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "0000002_init.png",
        "0000002_refined.png",
    ]


def test_the_data_is_loaded_by_the_main_process_first_once_the_accelerator_exists(
    tmp_path, monkeypatch
):
    inside: list[bool] = []
    state = {"first": False}
    real_first, real_load = Accelerator.main_process_first, loop.load_dataset

    @contextlib.contextmanager
    def main_process_first(self):
        with real_first(self):
            state["first"] = True
            try:
                yield
            finally:
                state["first"] = False

    def load_dataset(*args, **kwargs):
        inside.append(state["first"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Accelerator, "main_process_first", main_process_first)
    monkeypatch.setattr(loop, "load_dataset", load_dataset)
    argv = ["--config", "debug", "--output_dir", tmp_path / "run", "--report_to", "none"]
    assert _train(*argv, "--max_train_steps", "1", "--set", *FAST) == 0
    assert inside == [True]


# ----------------------------------------------------------------------------------------------------------
# Learning-rate rescaling.


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_rescaled_learning_rates_follow_the_schedule_from_the_new_base(name):
    """After ``scale_learning_rates`` the rates are the unscaled schedule's times the scale, at the same
    position and after it; the scheduler is rebuilt (the old one's base rates are left as they were) and
    the prepared wrapper checkpoints the new one."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/debug.yaml", [])
    accelerator = Accelerator(cpu=True)

    def prepared():
        torch.manual_seed(0)
        ebm, init = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        ebm_opt = torch.optim.Adam(ebm.parameters(), lr=cfg.train.ebm_lr)
        init_opt = torch.optim.AdamW(init.parameters(), lr=cfg.train.init_lr)
        scheds = [lr_schedule(name, opt, 3, 12) for opt in (ebm_opt, init_opt)]
        return TrainState(*accelerator.prepare(ebm, init, ebm_opt, init_opt, *scheds))

    models, reference = prepared(), prepared()
    for state in (models, reference):
        for _ in range(5):
            for opt, sched in (
                (state.ebm_opt, state.ebm_sched),
                (state.init_opt, state.init_sched),
            ):
                opt.step()
                sched.step()
    old = models.ebm_sched.scheduler
    old_base = list(old.base_lrs)
    scale_learning_rates(models, cfg, 0.25)
    assert models.ebm_sched.scheduler is not old and old.base_lrs == old_base
    for _ in range(4):
        for state in (models, reference):
            for sched in (state.ebm_sched, state.init_sched):
                assert sched.scheduler.last_epoch == reference.ebm_sched.scheduler.last_epoch
        for sched, ref, opt in (
            (models.ebm_sched, reference.ebm_sched, models.ebm_opt),
            (models.init_sched, reference.init_sched, models.init_opt),
        ):
            assert sched.get_last_lr()[0] == pytest.approx(0.25 * ref.get_last_lr()[0], rel=1e-12)
            assert opt.param_groups[0]["lr"] == pytest.approx(
                0.25 * ref.get_last_lr()[0], rel=1e-12
            )
        for state in (models, reference):
            for opt, sched in (
                (state.ebm_opt, state.ebm_sched),
                (state.init_opt, state.init_sched),
            ):
                opt.step()
                sched.step()
    saved = models.ebm_sched.state_dict()
    assert saved["base_lrs"] == [0.25 * cfg.train.ebm_lr] and saved["last_epoch"] == 9
