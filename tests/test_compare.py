"""The baselines of issue 7: the DRL config, the diffusion baseline and the comparison script, on tiny models."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from experiment_scripts import ROOT, load_experiment

from cdrl.config import load_config
from cdrl.evaluation.digits import DigitsClassifier, digits_split
from cdrl.models import EnergyResNet, build_models
from cdrl.pipeline import CDRLPipeline, CDRLScheduler

diffusion_baseline = load_experiment("diffusion_baseline")
compare = load_experiment("compare")

TINY_UNET = {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4}


@pytest.fixture(scope="module")
def classifier() -> DigitsClassifier:
    """An untrained but seeded digits classifier: its features are enough for smoke tests."""
    torch.manual_seed(0)
    return DigitsClassifier().eval()


@pytest.fixture(scope="module")
def tiny_diffusion_run(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("diffusion")
    summary = diffusion_baseline.train_diffusion(
        folder, max_steps=3, unet_kwargs=TINY_UNET, batch_size=16, log_every=1
    )
    return folder, summary


# ------------------------------------------------------------------ DRL config


def test_drl_config_is_drl_with_the_digits_ebm():
    cfg = load_config(ROOT / "configs/digits_drl.yaml")
    default = load_config(ROOT / "configs/digits.yaml")
    assert cfg.schedule.kind == "drl" and cfg.schedule.num_levels == 6
    assert cfg.initializer.arch == "none"
    assert cfg.langevin.n_steps == 30 and cfg.langevin.sample_steps == 30
    assert cfg.langevin.b2 == pytest.approx(2e-4) and cfg.langevin.tweedie is False
    assert cfg.ebm == default.ebm and cfg.data == default.data
    # Training differs from the CDRL default only in its length and in the initializer's settings it lacks
    # (refine_top too: CDRL's EBM learns at its noisiest levels, where its initializer alone falls short;
    # DRL has no initializer, so its EBM learns every level).
    initializer_only = {"init_lr", "init_weight_decay", "init_data_weight", "init_data_target"}
    initializer_only |= {"refine_top"}
    same = {f.name for f in dataclasses.fields(cfg.train)} - initializer_only - {"max_steps"}
    assert {k: getattr(cfg.train, k) for k in same} == {k: getattr(default.train, k) for k in same}
    assert (
        cfg.train.max_steps < default.train.max_steps
    )  # a DRL step costs more: fewer in equal time

    ebm, initializer = build_models(cfg, (1, 8, 8), ())
    assert initializer is None and isinstance(ebm, EnergyResNet)
    default_ebm, _ = build_models(default, (1, 8, 8), ())
    assert sum(p.numel() for p in ebm.parameters()) == sum(
        p.numel() for p in default_ebm.parameters()
    )

    # The exported scheduler samples with DRL's K = 30, no Tweedie step, on DRL's one-step sigmas (docs/method.md §2).
    scheduler = CDRLScheduler.from_training_config(cfg)
    settings = scheduler.langevin_settings()
    assert settings.n_steps == 30 and not settings.tweedie
    sigmas = scheduler.schedule.sigmas[1:]
    assert sigmas.tolist() == pytest.approx([0.324, 0.517, 0.632, 0.713, 0.773, 0.9997], abs=2e-3)


# ------------------------------------------------------------------ diffusion baseline


def test_diffusion_baseline_trains_saves_and_samples(tiny_diffusion_run):
    folder, summary = tiny_diffusion_run
    assert summary["steps"] == 3
    assert (folder / "pipeline/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "pipeline/scheduler/scheduler_config.json").is_file()
    assert json.loads((folder / "train.json").read_text())["steps"] == 3
    assert len((folder / "log.jsonl").read_text().splitlines()) == 3

    unet, scheduler = diffusion_baseline.load_diffusion(folder)
    assert diffusion_baseline.num_parameters(unet) == summary["num_parameters"]
    calls = []
    unet.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    out = {}
    for name, steps in (("ddpm", 4), ("ddim", 3)):
        calls.clear()
        x = diffusion_baseline.sample_diffusion(
            unet,
            name,
            steps,
            5,
            torch.Generator().manual_seed(0),
            train_scheduler=scheduler,
            batch_size=3,
        )
        assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
        assert x.min() >= -1 and x.max() <= 1
        assert calls == [3] * steps + [2] * steps  # one UNet evaluation per step and sample
        out[name] = x
    again = diffusion_baseline.sample_diffusion(
        unet,
        "ddim",
        3,
        5,
        torch.Generator().manual_seed(0),
        train_scheduler=scheduler,
        batch_size=3,
    )
    assert torch.equal(again, out["ddim"])  # bit-exact: the same seed, batches and process
    assert not torch.allclose(out["ddpm"][:, :, :4], out["ddim"][:, :, :4])
    with pytest.raises(ValueError, match="scheduler_name"):
        diffusion_baseline.sample_diffusion(unet, "euler", 3, 2)

    # clip_sample: None keeps the training scheduler's (diffusers' default, True); False stops clamping
    # x0-hat at every step, which a 3-step-trained UNet's large predictions make visible.
    def draw(clip):
        return diffusion_baseline.sample_diffusion(
            unet,
            "ddim",
            3,
            5,
            torch.Generator().manual_seed(0),
            train_scheduler=scheduler,
            batch_size=3,
            clip_sample=clip,
        )

    assert scheduler.config.clip_sample is True
    assert torch.equal(draw(True), out["ddim"])  # same process, batch and seed: bit-exact
    assert not torch.allclose(draw(False), out["ddim"], atol=1e-3)


def test_diffusion_baseline_stops_on_its_time_budget(tmp_path):
    summary = diffusion_baseline.train_diffusion(
        tmp_path, minutes=0.5 / 60, max_steps=10_000, unet_kwargs=TINY_UNET, batch_size=16
    )
    assert 1 <= summary["steps"] < 10_000
    assert (
        summary["loop_seconds"] >= 0.5
    )  # stopped by the budget (not max_steps): no wall-clock cap
    with pytest.raises(ValueError, match="budget"):
        diffusion_baseline.train_diffusion(tmp_path / "none", unet_kwargs=TINY_UNET)


# ------------------------------------------------------------------ digits FID


def test_digits_fid_is_zero_on_itself_and_grows_with_noise(classifier, tmp_path):
    """The comparison's FID is torch-fidelity's, on the registered digits-classifier features."""
    classifier.save_pretrained(tmp_path / "classifier")
    _, _, x_test, _ = digits_split()
    assert abs(compare.digits_fid(x_test, x_test, tmp_path / "classifier")) < 1e-3
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x_test.shape, generator=generator)
    fids = [
        compare.digits_fid((x_test + sigma * noise).clamp(-1, 1), x_test, tmp_path / "classifier")
        for sigma in (0.1, 0.3, 0.6, 1.0)
    ]
    assert fids[0] > 1e-4
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids


# ------------------------------------------------------------------ comparison script


def test_train_all_budgets_by_cpu_time_and_skips_finished_runs(tmp_path):
    calls = []

    def burn(cpu_seconds: float) -> None:
        end = time.process_time() + cpu_seconds
        while time.process_time() < end:
            pass

    def fake_train(folder: Path, steps: int, *, quiet: bool = False) -> dict:
        calls.append((steps, quiet))
        burn(0.05 + 0.002 * steps)  # fixed setup cost + 2 ms of CPU per step
        (folder / "pipeline").mkdir(parents=True)
        (folder / "pipeline/model_index.json").write_text("{}")
        return {"steps": steps}

    timing = compare.train_all(
        tmp_path, minutes=0.2 / 60, trainers={"fake": fake_train}, timing_steps={"fake": (10, 110)}
    )
    assert timing["fake"]["cpu_s_per_step"] == pytest.approx(0.002, rel=0.3)
    assert timing["fake"]["budget_steps"] == pytest.approx(100, rel=0.3)
    assert calls == [(10, True), (110, True), (timing["fake"]["budget_steps"], False)]
    saved = json.loads((tmp_path / "timing.json").read_text())
    assert saved["fake"]["budget_steps"] == timing["fake"]["budget_steps"]
    compare.train_all(
        tmp_path, minutes=0.2 / 60, trainers={"fake": fake_train}, timing_steps={"fake": (10, 110)}
    )
    assert len(calls) == 3  # timing cached, run finished: nothing is done again


def test_compare_evaluates_tiny_models_end_to_end(
    tmp_path, tiny_ebm, tiny_initializer, classifier, tiny_diffusion_run
):
    cdrl_pipe = CDRLPipeline(
        ebm=tiny_ebm, initializer=tiny_initializer, scheduler=CDRLScheduler(n_steps=2)
    )
    drl_pipe = CDRLPipeline(
        ebm=tiny_ebm,
        initializer=None,
        scheduler=CDRLScheduler(kind="drl", n_steps=2, b2=2e-4, tweedie=False),
    )
    cdrl_pipe.save_pretrained(tmp_path / "cdrl/pipeline")
    drl_pipe.save_pretrained(tmp_path / "drl")
    classifier.save_pretrained(tmp_path / "classifier")
    results = tmp_path / "results"
    argv = [
        "--cdrl",
        str(tmp_path / "cdrl"),
        "--drl",
        str(tmp_path / "drl"),
        "--diffusion",
        str(tiny_diffusion_run[0]),
        "--cdrl_steps",
        "1,2",
        "--cdrl_refine_top",
        "2",
        "--drl_steps",
        "1",
        "--ddpm_steps",
        "2",
        "--ddim_steps",
        "1,2",
        "--num_samples",
        "12",
        "--batch_size",
        "8",
        "--classifier",
        str(tmp_path / "classifier"),
        "--results_dir",
        str(results),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--name",
        "cmp",
    ]
    assert compare.main(argv) == 0

    result = json.loads((tmp_path / "runs/cmp.json").read_text())
    settings = [(r["sampler"], r["steps"], r["nfe"]) for r in result["rows"]]
    # NFE: CDRL 6 initializer forwards + 6 K + 1 Tweedie, DRL 6 K, diffusion one UNet call per step.
    # Diffusion with diffusers' default clip_sample ("-clip") and without it; CDRL likewise.
    assert settings == [
        ("CDRL", 1, 13),
        ("CDRL", 2, 19),
        ("CDRL-clip", 1, 13),
        ("CDRL-clip", 2, 19),
        ("CDRL-top2", 1, 9),  # 6 proposals, K at the 2 noisiest of 6 levels, 1 Tweedie step
        ("CDRL-top2", 2, 11),
        ("CDRL-top2-clip", 1, 9),
        ("CDRL-top2-clip", 2, 11),
        ("DRL", 1, 6),
        ("DDPM-clip", 2, 2),
        ("DDIM-clip", 1, 1),
        ("DDIM-clip", 2, 2),
        ("DDPM", 2, 2),
        ("DDIM", 1, 1),
        ("DDIM", 2, 2),
    ]
    for row in result["rows"] + [result["reference"]]:
        assert 0 <= row["confident_fraction"] <= 1 and row["fid"] >= 0
    report = (results / "cmp.md").read_text()
    assert "| cdrl | CDRL | 2 | 19 |" in report and "| diffusion | DDIM | 2 | 2 |" in report
    assert "real test digits" in report and "python experiments/compare.py --cdrl" in report
    for name in (
        "cmp.png",
        "cmp_cdrl_2.png",
        "cmp_drl_1.png",
        "cmp_ddpm_2.png",
        "cmp_ddim_2.png",
        "cmp_ddpm-clip_2.png",
    ):
        assert (results / name).is_file(), name

    # A hand-written notes section survives a rewrite of the report.
    (results / "cmp.md").write_text(report + "\n## Notes\nthe grids look fine\n")
    compare.write_report(
        results / "cmp.md",
        result,
        command="cmd",
        timing={},
        params={},
        folders={"cdrl": "x"},
        plot_path=None,
    )
    rewritten = (results / "cmp.md").read_text()
    assert rewritten.endswith("## Notes\nthe grids look fine\n") and "cmd" in rewritten


def test_trained_levels_reads_the_training_config(tmp_path):
    from cdrl.config import load_config, save_config

    assert compare.trained_levels(tmp_path, 12) == 12  # no training_config.yaml: every level
    save_config(
        load_config(overrides=["schedule.num_levels=12"]), tmp_path / "training_config.yaml"
    )
    assert compare.trained_levels(tmp_path, 12) == 12
    cfg = load_config(
        overrides=[
            "schedule.num_levels=12",
            "train.refine_top=2",
            "langevin.refine_top=2",
            "langevin.tweedie=false",
        ]
    )
    save_config(cfg, tmp_path / "training_config.yaml")
    assert compare.trained_levels(tmp_path, 12) == 2
