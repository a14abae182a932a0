"""Tests of training (cdrl.training, cdrl.cli.train): ``train_step`` alone, ``main`` end to end on
configs/debug.yaml (artifacts, export, resume, checkpoint limit, --dry-run, 2-D toys).

Everything runs in-process on the CPU in a few seconds per run; the multi-process launches are in
tests/test_distributed.py, bad input in tests/test_bad_inputs.py, the divergence guard, crash safety,
safe loading and determinism in tests/test_reliability.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from conftest import reset_accelerate, train_debug
from diffusers.optimization import get_constant_schedule_with_warmup

from cdrl.cli.train import main
from cdrl.config import load_config
from cdrl.models import build_models
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.schedule import NoiseSchedule
from cdrl.training.step import Models, train_step

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs/debug.yaml"
TOY = [
    "data.name=checkerboard",
    "data.toy_size=256",
    "ebm.arch=mlp",
    "initializer.arch=mlp",
    "ebm.hidden=16",
    "initializer.hidden=16",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def _metrics(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-"))


# ----------------------------------------------------------------------------------------------------------
# train_step alone.


def _models(cfg, accelerator: Accelerator, sample_shape=(1, 8, 8), condition_sizes=()) -> Models:
    """Models, optimizers and warmup schedulers built and prepared as ``run`` does."""
    ebm, init = build_models(cfg, sample_shape, condition_sizes)
    betas = (cfg.train.adam_beta1, cfg.train.adam_beta2)
    warmup = cfg.train.warmup_steps * accelerator.num_processes
    ebm_opt = torch.optim.Adam(ebm.parameters(), lr=cfg.train.ebm_lr, betas=betas)
    ebm_sched = get_constant_schedule_with_warmup(ebm_opt, warmup)
    if init is None:
        ebm, ebm_opt, ebm_sched = accelerator.prepare(ebm, ebm_opt, ebm_sched)
        return Models(ebm, None, ebm_opt, None, ebm_sched, None)
    init_opt = torch.optim.AdamW(
        init.parameters(),
        lr=cfg.train.init_lr,
        betas=betas,
        weight_decay=cfg.train.init_weight_decay,
    )
    init_sched = get_constant_schedule_with_warmup(init_opt, warmup)
    prepared = accelerator.prepare(ebm, init, ebm_opt, init_opt, ebm_sched, init_sched)
    return Models(*prepared)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _step(overrides=(), condition_sizes=()):
    """One train_step on a random digits-shaped batch; returns (stats, models, params before)."""
    # warmup 0: with warmup the first step runs at lr 0 (diffusers' warmup starts at 0).
    cfg = load_config(DEBUG, ["train.warmup_steps=0", *overrides])
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    models = _models(cfg, accelerator, condition_sizes=condition_sizes)
    before = {"ebm": _params(models.ebm)}
    if models.initializer is not None:
        before["init"] = _params(models.initializer)
    schedule = CDRLScheduler.from_training_config(cfg).schedule
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    if condition_sizes:
        cond = torch.randint(0, condition_sizes[0], (16, 1))
    else:
        cond = torch.zeros(16, 0, dtype=torch.long)
    stats, problem = train_step(models, (x0, cond), cfg, schedule, accelerator, condition_sizes)
    assert problem is None, problem
    return stats, models, before, cfg


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, bool]:
    return {name: not torch.equal(before[name], p) for name, p in module.named_parameters()}


def test_train_step_updates_both_networks_and_returns_finite_stats():
    stats, models, before, cfg = _step()
    for key in ("ebm/loss", "ebm/energy_gap", "ebm/grad_norm", "init/mse", "init/grad_norm"):
        assert key in stats, key
        assert stats[key].dim() == 0 and math.isfinite(stats[key].item()), key
    T = cfg.schedule.num_levels
    for key in ("level/count", "level/gap", "level/move", "level/rms_err"):
        assert stats[key].shape == (T,) and torch.isfinite(stats[key]).all(), key
    assert stats["level/count"].sum().item() == 16
    assert not any(value.requires_grad for value in stats.values())

    # Every parameter with a non-zero gradient moved (Adam, lr > 0), in both networks. (The
    # initializer's output layer starts at zero, so at step 1 only its last layers get gradient.)
    for name, module in (("ebm", models.ebm), ("init", models.initializer)):
        changed = _changed(before[name], module)
        with_grad = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.any()}
        assert with_grad, name
        assert all(changed[n] for n in with_grad), (name, [n for n in with_grad if not changed[n]])
        # the spectral-normalised weights (parametrizations.*.original) are among them
        if name == "ebm":
            assert any("parametrizations" in n and changed[n] for n in changed)

    # frozen() around the Langevin refinement restored requires_grad and the training mode.
    for module in (models.ebm, models.initializer):
        assert all(p.requires_grad for p in module.parameters())
        assert module.training


def test_train_step_drl_without_initializer():
    stats, models, before, _ = _step(["initializer.arch=none", "schedule.kind=drl"])
    assert models.initializer is None and models.init_opt is None
    assert "ebm/loss" in stats and math.isfinite(stats["ebm/loss"].item())
    assert not any(key.startswith("init/") for key in stats)
    assert any(_changed(before["ebm"], models.ebm).values())
    assert all(p.requires_grad for p in models.ebm.parameters())


def test_train_step_class_conditional():
    stats, models, before, _ = _step(["data.class_conditional=true"], condition_sizes=(10,))
    assert all(math.isfinite(v.item()) for k, v in stats.items() if not k.startswith("level/"))
    assert any(_changed(before["init"], models.initializer).values())


# ----------------------------------------------------------------------------------------------------------
# main() end to end.


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory) -> Path:
    """configs/debug.yaml trained 0 -> 4 in one go (seed 0)."""
    output_dir = tmp_path_factory.mktemp("debug") / "run"
    assert train_debug(output_dir) == 0
    return output_dir


def test_main_writes_the_run_and_exports_a_working_pipeline(debug_run: Path):
    out = debug_run
    cfg = load_config(out / "config.yaml")
    # The run records the precision it used: "auto" resolves to accelerate's default here, "no".
    assert cfg == load_config(DEBUG, [f"log.output_dir={out}", "train.mixed_precision=no"])
    assert (out / "git.txt").read_text().strip()
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert math.isfinite(record["ebm/loss"]) and "init/mse" in record and "level1/gap" in record
    assert records[-1]["lr/ebm"] == pytest.approx(cfg.train.ebm_lr)  # warmup (2 steps) is over
    samples = sorted(p.name for p in (out / "samples").iterdir())
    for step in (2, 4):
        assert f"{step:07d}_refined.png" in samples and f"{step:07d}_init.png" in samples
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    assert load_config(out / "pipeline" / "training_config.yaml") == cfg

    pipe = CDRLPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (3, 1, 8, 8)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert pipe.scheduler.config.n_steps == 2 and pipe.initializer is not None


def test_resume_latest_continues_from_the_checkpoint(tmp_path: Path):
    out = tmp_path / "run"
    assert train_debug(out, "--max_train_steps", "2") == 0
    assert _checkpoints(out) == ["checkpoint-2"]
    assert train_debug(out, "--resume_from_checkpoint", "latest", "--max_train_steps", "4") == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert load_config(out / "config.yaml").train.max_steps == 4
    assert (out / "pipeline" / "model_index.json").is_file()
    # an explicit checkpoint folder, relative to the run, also resumes (and changes nothing at 4 -> 4)
    assert (
        train_debug(out, "--resume_from_checkpoint", "checkpoint-4", "--max_train_steps", "4") == 0
    )
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]


def test_resume_is_deterministic(debug_run: Path, tmp_path: Path):
    """0 -> 4 in one go and 0 -> 2, then 2 -> 4 resumed, log the same losses at steps 3 and 4."""
    out = tmp_path / "run"
    assert train_debug(out, "--max_train_steps", "2") == 0
    assert train_debug(out, "--resume_from_checkpoint", "latest", "--max_train_steps", "4") == 0
    one_go, resumed = _metrics(debug_run), _metrics(out)
    # steps 1 and 2 ran identically (same seed): the runs are comparable
    for a, b in zip(one_go[:2], resumed[:2], strict=True):
        assert a["ebm/loss"] == pytest.approx(b["ebm/loss"], abs=1e-5)
    for a, b in zip(one_go[2:], resumed[2:], strict=True):
        assert a["step"] == b["step"]
        for key in ("ebm/loss", "init/mse", "ebm/energy_gap"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_checkpoints_total_limit_keeps_only_the_newest_class_conditional(tmp_path: Path):
    """Also runs the class-conditional code paths (label dropout, labelled grids, guided export)."""
    out = tmp_path / "run"
    args = ["--checkpoints_total_limit", "1", "--set", "data.class_conditional=true"]
    assert train_debug(out, *args) == 0
    assert _checkpoints(out) == ["checkpoint-4"]
    assert not list(out.glob(".tmp-*"))
    assert (out / "samples" / "0000004_refined.png").is_file()
    pipe = CDRLPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.condition_sizes == (10,)
    images = pipe(class_labels=[0, 3], guidance_scale=2.0, output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_log_file_belongs_to_its_own_run(tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    fast = ["--max_train_steps", "1", "--set", "log.sample_every=0"]
    assert train_debug(first, *fast) == 0
    assert train_debug(second, *fast) == 0
    assert str(second) in (second / "log.txt").read_text()  # "exported the EMA pipeline to ..."
    assert str(second) not in (first / "log.txt").read_text()


def test_toy_2d_run_exports_a_vector_pipeline(tmp_path: Path):
    out = tmp_path / "toy"
    assert train_debug(out, "--max_train_steps", "3", "--set", *TOY) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    assert (out / "samples" / "0000002_refined.png").is_file()  # scatter plots for 2-D data
    assert (out / "samples" / "0000003_init.png").is_file()
    pipe = CDRLPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.sample_shape == (2,)
    x = pipe(batch_size=5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert x.shape == (5, 2) and torch.isfinite(x).all()


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path: Path, capsys):
    out = tmp_path / "never"
    argv = ["--config", str(DEBUG), "--output_dir", str(out), "--dry-run"]
    argv += ["--max_train_steps", "7", "--set", "langevin.n_steps=3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    expected = load_config(
        DEBUG, [f"log.output_dir={out}", "train.max_steps=7", "langevin.n_steps=3"]
    )
    assert resolved == dataclasses.asdict(expected)
    # the printed YAML is itself a valid --config that resolves to the same settings
    (tmp_path / "resolved.yaml").write_text(printed)
    assert load_config(tmp_path / "resolved.yaml") == expected
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# Refusals (the table of bad inputs of every CLI is in tests/test_bad_inputs.py).


def test_existing_run_is_resumable_after_refusal(debug_run: Path, tmp_path: Path):
    """The refusal message's advice works: --resume_from_checkpoint latest on a finished run exports
    again without training (step 4 of 4) and without duplicating metrics."""
    out = tmp_path / "run"
    shutil.copytree(debug_run, out)
    assert train_debug(out, "--resume_from_checkpoint", "latest") == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_lr_schedule_warms_up_then_follows_its_shape(name):
    from cdrl.training.step import lr_schedule

    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = lr_schedule(name, opt, warmup=10, total=100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    expected_end = {"constant": 1.0, "cosine": 0.0, "linear": 0.01}[name]
    assert lrs[-1] == pytest.approx(expected_end, abs=2e-3)


def test_bf16_training_runs_the_langevin_forwards_in_bf16(monkeypatch):
    """mixed_precision=bf16 autocasts the chain's convolutions; the chain state stays float32."""
    import cdrl.training.step as train_module

    conv_dtypes: list[torch.dtype] = []
    original_conv = torch.nn.functional.conv2d

    def conv_spy(x, *args, **kwargs):
        out = original_conv(x, *args, **kwargs)
        conv_dtypes.append(out.dtype)
        return out

    real_refine = train_module.langevin_refine
    seen = {}

    def refine_spy(fn, y, *args, **kwargs):
        monkeypatch.setattr(torch.nn.functional, "conv2d", conv_spy)
        try:
            out = real_refine(fn, y, *args, **kwargs)
        finally:
            monkeypatch.setattr(torch.nn.functional, "conv2d", original_conv)
        seen["in"], seen["out"] = y.dtype, out.dtype
        return out

    monkeypatch.setattr(train_module, "langevin_refine", refine_spy)
    _step(["train.mixed_precision=bf16"])
    assert seen == {"in": torch.float32, "out": torch.float32}
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}

    conv_dtypes.clear()
    _step()  # float32 by default
    assert conv_dtypes and set(conv_dtypes) == {torch.float32}


def test_repeated_set_flags_accumulate():
    """`--set a=1 --set b=2` keeps both overrides (argparse's default would keep only the last)."""
    from cdrl.cli.train import parse_args

    cfg, _ = parse_args(
        [
            "--config",
            "configs/toy2d.yaml",
            "--set",
            "train.max_steps=7",
            "langevin.n_steps=3",
            "--set",
            "train.lr_schedule=cosine",
        ]
    )
    assert cfg.train.max_steps == 7 and cfg.langevin.n_steps == 3
    assert cfg.train.lr_schedule == "cosine"


@pytest.mark.parametrize("target", ["paired", "posterior_mean"])
def test_initializer_data_term_regresses_onto_its_configured_target(monkeypatch, target):
    # Capture the pair q_pair drew and the target train_step hands to initializer_loss.
    import cdrl.training.step as train_module

    seen = {}
    real_pair, real_loss = NoiseSchedule.q_pair, train_module.initializer_loss

    def spy_pair(self, x0, t, **kwargs):
        seen["x0"], seen["t"] = x0, t
        seen["x_t"], seen["x_next"] = real_pair(self, x0, t, **kwargs)
        return seen["x_t"], seen["x_next"]

    def spy_loss(proposal, y_neg, **kwargs):
        seen.update(kwargs)
        return real_loss(proposal, y_neg, **kwargs)

    monkeypatch.setattr(NoiseSchedule, "q_pair", spy_pair)
    monkeypatch.setattr(train_module, "initializer_loss", spy_loss)
    _, _, _, cfg = _step(["train.init_data_weight=2", f"train.init_data_target={target}"])
    schedule = CDRLScheduler.from_training_config(cfg).schedule
    assert seen["data_weight"] == 2.0
    # y-space: sqrt(alpha_{t+1}) times x_t or times the DDPM posterior mean mu~(x_0, x_{t+1}).
    scale = schedule.y_scales[seen["t"]].float().view(-1, 1, 1, 1)
    if target == "paired":
        expected = scale * seen["x_t"]
    else:
        expected = scale * schedule.posterior_mean(seen["x0"], seen["x_next"], seen["t"])
        assert not torch.allclose(expected, scale * seen["x_t"], atol=1e-3)
    torch.testing.assert_close(seen["y_data"], expected, rtol=1e-6, atol=1e-6)
