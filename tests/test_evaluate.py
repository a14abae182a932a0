"""Tests of the cdrl.cli.evaluate CLI (figures, JSON schema, bad input), its sampling, and cdrl.evaluation.ood.

Tiny 8x8 pipelines and the default digits classifier (trained once per session, conftest.py): the
digits extractor stands in for Inception, which cannot be downloaded here. The cache root ($CDRL_CACHE_DIR) is a temporary folder.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_float32, assert_uint8_close
from PIL import Image

import cdrl.evaluation.digits as dc
from cdrl.cli import evaluate
from cdrl.evaluation.fidelity import sample_images
from cdrl.evaluation.ood import auroc, lowest_level_energy, ood_report
from cdrl.generation import generate_samples
from cdrl.images import to_uint8
from cdrl.models import EnergyResNet, InitializerUNet
from cdrl.pipeline import CDRLPipeline, CDRLScheduler

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
SCHEMA_KEYS = {"schema", "metrics", "details", "settings", "versions", "seconds"}
SETTINGS_KEYS = {
    "checkpoint",
    "metrics",
    "num_samples",
    "seed",
    "batch_size",
    "class_labels",
    "guidance_scale",
    "num_langevin_steps",
    "reference",
    "heldout",
    "ood",
    "num_examples",
    "feature_extractor",
    "feature_extractor_weights",
    "fidelity",
    "num_processes",
    "device",
}
VERSION_KEYS = {
    "cdrl",
    "git",
    "python",
    "torch",
    "torchvision",
    "torch_fidelity",
    "diffusers",
    "accelerate",
    "numpy",
}


def _build_pipeline(condition_sizes: tuple[int, ...], data_scale: float = 1.0) -> CDRLPipeline:
    torch.manual_seed(0)
    ebm = EnergyResNet(
        in_channels=1,
        sample_size=8,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        condition_sizes=condition_sizes,
    ).eval()
    initializer = InitializerUNet(
        in_channels=1,
        sample_size=8,
        block_out_channels=(8, 16),
        attention_levels=(False, True),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        condition_sizes=condition_sizes,
    ).eval()
    with torch.no_grad():  # a non-trivial proposal mean (the output layer is zero-initialized)
        for param in initializer.parameters():
            if param.abs().max() == 0:
                param.copy_(0.05 * torch.randn(param.shape))
    scheduler = CDRLScheduler(n_steps=2, data_scale=data_scale)
    pipe = CDRLPipeline(ebm=ebm, initializer=initializer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def uncond_pipe() -> CDRLPipeline:
    return _build_pipeline(())


@pytest.fixture(scope="module")
def cond_pipe() -> CDRLPipeline:
    return _build_pipeline((NUM_CLASSES,))


@pytest.fixture(scope="module")
def uncond_checkpoint(uncond_pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("uncond") / "pipeline"
    uncond_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cond_checkpoint(cond_pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cond") / "pipeline"
    cond_pipe.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own $CDRL_CACHE_DIR (the fidelity cache and a first-use classifier)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CDRL_CACHE_DIR", str(path))
    return path


@pytest.fixture
def noise_folder(tmp_path) -> Path:
    """12 uniform-noise 8x8 greyscale PNGs."""
    folder = tmp_path / "noise"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / f"{k}.png")
    return folder


def _run(argv: list, capsys) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv] + ["--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ the CLI, end to end


def test_json_schema_and_figures(uncond_checkpoint, weights, tmp_path, capsys):
    out = tmp_path / "results" / "eval.json"
    argv = ["--checkpoint", uncond_checkpoint, "--reference", "digits-test", "--num_samples", 24]
    code, stdout, stderr = _run(
        [*argv, "--batch_size", 10, "--digits_classifier", weights, "--output", out], capsys
    )
    assert code == 0, stderr
    assert stdout.splitlines()[-1] == f"wrote {out}" and stdout.startswith("fid ")
    result = json.loads(out.read_text())
    assert set(result) == SCHEMA_KEYS and result["schema"] == "cdrl-evaluate/1"
    assert set(result["metrics"]) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in result["metrics"].values())
    assert result["metrics"]["fid"] > 0 and 1 <= result["metrics"]["isc_mean"] <= NUM_CLASSES
    settings = result["settings"]
    assert set(settings) == SETTINGS_KEYS
    assert settings["metrics"] == ["fid", "kid", "isc"] and settings["num_samples"] == 24
    assert settings["checkpoint"] == str(uncond_checkpoint) and settings["num_langevin_steps"] == 2
    assert settings["reference"] == {
        "spec": "digits-test",
        "kind": "registered",
        "size": 360,
        "shape": [1, 8, 8],
        "num_bins": 17,
    }
    assert settings["feature_extractor"] == "digits-classifier"
    assert settings["feature_extractor_weights"] == str(weights)
    assert (
        settings["fidelity"]["kid_subset_size"] == 24 and settings["fidelity"]["isc_splits"] == 10
    )
    assert settings["class_labels"] is None and settings["guidance_scale"] is None
    assert settings["num_processes"] == 1 and settings["device"] == "cpu"
    assert set(result["versions"]) == VERSION_KEYS
    assert set(result["seconds"]) == {"sampling", "sample_metrics"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]  # no temporaries left
    # The reference's features and statistics were cached under $CDRL_CACHE_DIR/fidelity.
    name = settings["fidelity"]["reference_cache_name"]
    cached = list((tmp_path / "cache" / "fidelity").iterdir())
    assert cached and all(p.name.startswith(name) for p in cached)


def test_figures_do_not_depend_on_batch_size(uncond_checkpoint, weights, tmp_path, capsys):
    argv = ["--checkpoint", uncond_checkpoint, "--reference", "digits-test", "--num_samples", 12]
    argv += ["--metrics", "fid", "isc", "--digits_classifier", weights, "--seed", 3, "--no_cache"]
    figures = []
    for batch_size in (5, 12):
        out = tmp_path / f"b{batch_size}.json"
        code, _, stderr = _run([*argv, "--batch_size", batch_size, "--output", out], capsys)
        assert code == 0, stderr
        figures.append(json.loads(out.read_text())["metrics"])
    # The same samples; features in batches of another size differ only in float rounding.
    assert figures[0] == pytest.approx(figures[1], rel=1e-6)
    assert not (tmp_path / "cache" / "fidelity").exists()  # --no_cache


def test_sample_images_are_generate_samples_rounded(cond_pipe):
    labels, seeds = [3, 1, 4, 1, 5], [7, 8, 9, 10, 11]
    images = sample_images(cond_pipe, labels, seeds, guidance_scale=2.0, batch_size=2)
    expected = generate_samples(cond_pipe, labels, seeds, guidance_scale=2.0, batch_size=5)
    # batches of 2 and of 5: float32 may round a pixel a hair from a level boundary the other way
    assert images.dtype == torch.uint8
    assert_uint8_close(images, to_uint8(expected))


def test_conditional_accuracy_and_guidance(cond_checkpoint, weights, tmp_path, capsys):
    out = tmp_path / "cond.json"
    argv = [
        "--checkpoint",
        cond_checkpoint,
        "--all_classes",
        "--guidance_scale",
        2,
        "--num_samples",
    ]
    argv += [20, "--metrics", "accuracy", "isc", "--digits_classifier", weights, "--output", out]
    code, stdout, stderr = _run(argv, capsys)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == {"accuracy", "isc_mean", "isc_std"} and "accuracy" in stdout
    accuracy = result["details"]["accuracy"]
    assert 0 <= result["metrics"]["accuracy"] == accuracy["accuracy"] <= 1
    assert sorted(accuracy["per_class"], key=int) == [str(c) for c in range(NUM_CLASSES)]
    assert result["settings"]["class_labels"] == list(range(NUM_CLASSES))
    assert result["settings"]["guidance_scale"] == 2.0 and result["settings"]["reference"] is None


def test_accuracy_counts_the_requested_labels(
    cond_checkpoint, classifier, weights, monkeypatch, tmp_path, capsys
):
    # Swap the samples for real test digits: with the matching labels the accuracy is the classifier's.
    from cdrl.evaluation.digits import digits_split

    _, _, x_test, y_test = digits_split()
    order = torch.argsort(y_test, stable=True)
    by_class = [x_test[order][y_test[order] == c][:3] for c in (2, 7)]
    real = torch.stack([by_class[k % 2][k // 2] for k in range(6)])  # labels 2, 7, 2, 7, 2, 7

    def fake_sample_images(pipe, labels, seeds, **kwargs):
        assert labels == [2, 7, 2, 7, 2, 7] and list(seeds) == list(range(6))
        return to_uint8(real)

    monkeypatch.setattr(evaluate, "sample_images", fake_sample_images)
    out = tmp_path / "acc.json"
    argv = ["--checkpoint", cond_checkpoint, "--class_labels", 2, 7, "--num_samples", 6]
    code, _, stderr = _run(
        [*argv, "--metrics", "accuracy", "--digits_classifier", weights, "--output", out], capsys
    )
    assert code == 0, stderr
    # by hand, not through the library's accuracy code: the classifier's argmax against the labels
    with torch.no_grad():
        logits = classifier(to_uint8(real).float() / 127.5 - 1)
    expected = (logits.argmax(1) == torch.tensor([2, 7] * 3)).double().mean().item()
    assert json.loads(out.read_text())["metrics"]["accuracy"] == pytest.approx(expected)


def test_digits_classifier_is_trained_on_first_use(
    uncond_checkpoint, classifier, cache_dir, monkeypatch, tmp_path, capsys
):
    calls = []

    def fake_train(**kwargs):
        calls.append(kwargs)
        return classifier

    monkeypatch.setattr(dc, "train_digits_classifier", fake_train)
    out = tmp_path / "first.json"
    argv = ["--checkpoint", uncond_checkpoint, "--metrics", "isc", "--num_samples", 4]
    code, _, stderr = _run([*argv, "--output", out], capsys)
    assert code == 0, stderr
    assert len(calls) == 1 and (cache_dir / "digits_classifier" / "config.json").is_file()
    settings = json.loads(out.read_text())["settings"]
    assert settings["feature_extractor_weights"] == str(cache_dir / "digits_classifier")


def test_shim_runs_main(uncond_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.json"
    argv = ["--checkpoint", str(uncond_checkpoint), "--metrics", "isc", "--class_labels", "1"]
    argv += ["--output", str(out)]
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --class_labels was given, but checkpoint {uncond_checkpoint} is unconditional"
    ]
    assert not out.exists()


# ------------------------------------------------------------------ bad input


def _bad_inputs(cond: Path, uncond: Path, vector: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    """case -> (argv without the default --output, a part of the one-line error)."""
    bogus = tmp / "bogus.pth"
    bogus.write_bytes(b"not a checkpoint")
    (tmp / "a_file").write_text("x")
    ref = ["--reference", "digits-test"]
    return {
        "missing checkpoint": (["--checkpoint", tmp / "nowhere", *ref], "does not exist"),
        "unknown metric": (
            ["--checkpoint", uncond, "--metrics", "fid", "fidd", *ref],
            "invalid choice: 'fidd'",
        ),
        "unknown reference": (
            ["--checkpoint", uncond, "--reference", "digitz"],
            "unknown reference 'digitz'",
        ),
        "reference of another shape": (
            ["--checkpoint", uncond, "--reference", ROOT / "configs/toy2d.yaml"],
            "holds 2-d data",
        ),
        "registered reference not found": (
            ["--checkpoint", uncond, "--reference", "cifar10-val", "--data_dir", tmp / "nowhere"],
            "could not be loaded",
        ),
        "labels, unconditional model": (
            ["--checkpoint", uncond, "--class_labels", 1, *ref],
            "is unconditional",
        ),
        "label out of range": (
            ["--checkpoint", cond, "--class_labels", 10, *ref],
            "outside [0, 10)",
        ),
        "guidance without labels": (
            ["--checkpoint", cond, "--guidance_scale", 2, *ref],
            "--guidance_scale needs",
        ),
        "output under a file": (
            ["--checkpoint", uncond, *ref, "--output", tmp / "a_file" / "e.json"],
            "is a file, not a folder",
        ),
        "unwritable system path": (
            ["--checkpoint", uncond, *ref, "--output", "/proc/cdrl-test/e.json"],
            "cannot be written",
        ),
        "output not json": (
            ["--checkpoint", uncond, *ref, "--output", tmp / "e.txt"],
            "must be a .json file",
        ),
        "inception weights missing": (
            [
                "--checkpoint",
                uncond,
                *ref,
                "--feature_extractor",
                "inception",
                "--inception_weights",
                tmp / "none.pth",
            ],
            "is not a file",
        ),
        "inception weights unusable": (
            [
                "--checkpoint",
                uncond,
                *ref,
                "--feature_extractor",
                "inception",
                "--inception_weights",
                bogus,
            ],
            "could not be loaded from",
        ),
        "inception weights, digits extractor": (
            ["--checkpoint", uncond, *ref, "--inception_weights", bogus],
            "inception extractor",
        ),
        "fid without reference": (["--checkpoint", uncond], "needs --reference"),
        "accuracy without labels": (
            ["--checkpoint", cond, "--metrics", "accuracy"],
            "needs --class_labels",
        ),
        "ood without ood sets": (
            ["--checkpoint", uncond, "--metrics", "ood", *ref],
            "needs --ood",
        ),
        "ood sets without ood": (
            ["--checkpoint", uncond, *ref, "--ood", "digits-train"],
            "--ood needs --metrics ood",
        ),
        "unused reference": (
            ["--checkpoint", uncond, "--metrics", "isc", *ref],
            "none of which was asked for",
        ),
        "zero samples": (["--checkpoint", uncond, *ref, "--num_samples", 0], "at least 1"),
        "vector model": (["--checkpoint", vector, "--metrics", "isc"], "not images"),
    }


BAD_INPUT_CASES = [
    "missing checkpoint",
    "unknown metric",
    "unknown reference",
    "reference of another shape",
    "registered reference not found",
    "labels, unconditional model",
    "label out of range",
    "guidance without labels",
    "output under a file",
    "unwritable system path",
    "output not json",
    "inception weights missing",
    "inception weights unusable",
    "inception weights, digits extractor",
    "fid without reference",
    "accuracy without labels",
    "ood without ood sets",
    "ood sets without ood",
    "unused reference",
    "zero samples",
    "vector model",
]


@pytest.fixture(scope="module")
def vector_checkpoint(tmp_path_factory) -> Path:
    from conftest import build_mlp_ebm, build_mlp_initializer

    path = tmp_path_factory.mktemp("vector") / "pipeline"
    pipe = CDRLPipeline(
        ebm=build_mlp_ebm(), initializer=build_mlp_initializer(), scheduler=CDRLScheduler()
    )
    pipe.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_exit_2_and_no_output(
    cond_checkpoint, uncond_checkpoint, vector_checkpoint, weights, tmp_path, capsys, case
):
    argv, match = _bad_inputs(cond_checkpoint, uncond_checkpoint, vector_checkpoint, tmp_path)[case]
    if "--output" not in argv:
        argv = [*argv, "--output", tmp_path / "out" / "e.json"]
    if "--inception_weights" not in argv and "--feature_extractor" not in argv:
        argv = [*argv, "--digits_classifier", weights]  # no first-use training here
    before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = _run(argv, capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert match in lines[0]
    assert stdout == ""
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the output's parent


# ------------------------------------------------------------------ held-out metrics


def test_bpd_calls_the_density_module(uncond_checkpoint, tmp_path, monkeypatch, capsys):
    calls = []

    def bits_per_dim(pipeline, x0, **kwargs):
        calls.append((pipeline, x0, kwargs))
        nll = [float(k) for k in range(len(x0))]
        return {
            "nll_nats": float(np.mean(nll)),
            "bpd": 1.25,
            "nll_per_example": nll,
            "convention": "test",
        }

    monkeypatch.setattr("cdrl.evaluation.bpd.bits_per_dim", bits_per_dim)
    out = tmp_path / "bpd.json"
    argv = ["--checkpoint", uncond_checkpoint, "--metrics", "bpd", "--heldout", "digits-test"]
    argv += ["--num_examples", 7, "--bpd_num_chains", 3, "--batch_size", 5, "--seed", 2]
    code, stdout, stderr = _run([*argv, "--output", out], capsys)
    assert code == 0, stderr
    ((pipeline, x0, kwargs),) = calls
    assert isinstance(pipeline, CDRLPipeline) and x0.shape == (7, 1, 8, 8)
    levels = torch.unique((x0 + 1) / 2 * 16)  # the digits' exact values: 17 levels in [-1, 1]
    torch.testing.assert_close(levels, levels.round())
    assert kwargs["num_chains"] == 3 and kwargs["num_bins"] == 17 and kwargs["batch_size"] == 5
    assert "num_intermediate" not in kwargs and isinstance(kwargs["generator"], torch.Generator)
    result = json.loads(out.read_text())
    assert result["metrics"] == {"bpd": 1.25, "nll_nats": 3.0} and "bpd 1.25" in stdout
    details = result["details"]["bpd"]
    levels = pipeline.scheduler.schedule.num_levels - 1  # the default: every level below the top
    assert kwargs["gaussian_levels"] == levels and len(kwargs["gaussian_variances"]) == levels
    assert details == {
        "convention": "test",
        "num_examples": 7,
        "num_chains": 3,
        "num_bins": 17,
        "gaussian_levels": levels,
        "gaussian_variances": kwargs["gaussian_variances"],
        "gaussian_variances_fitted_on": "digits-train",
        "gaussian_fit_examples": 1437,
    }
    assert result["settings"]["heldout"]["spec"] == "digits-test"
    assert result["settings"]["num_samples"] is None and "sampling" not in result["seconds"]


def test_bpd_with_the_density_module(uncond_checkpoint, tmp_path, capsys):
    pytest.importorskip(
        "cdrl.evaluation.bpd",
        reason="cdrl/evaluation/bpd.py (bits_per_dim) is not in this checkout",
    )
    out = tmp_path / "bpd.json"
    argv = ["--checkpoint", uncond_checkpoint, "--metrics", "bpd", "--heldout", "digits-test"]
    argv += ["--num_examples", 2, "--bpd_num_chains", 2, "--bpd_num_intermediate", 2]
    code, _, stderr = _run([*argv, "--output", out], capsys)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert np.isfinite(result["metrics"]["bpd"]) and np.isfinite(result["metrics"]["nll_nats"])
    assert isinstance(result["details"]["bpd"]["convention"], str)
    assert "nll_per_example" not in result["details"]["bpd"]


def test_ood_auroc_from_the_cli(uncond_checkpoint, noise_folder, tmp_path, capsys):
    out = tmp_path / "ood.json"
    argv = ["--checkpoint", uncond_checkpoint, "--metrics", "ood", "--reference", "digits-test"]
    argv += ["--ood", noise_folder, "--num_examples", 30]
    code, stdout, stderr = _run([*argv, "--output", out], capsys)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    auroc_value = result["metrics"]["ood_auroc"][str(noise_folder)]
    assert 0 <= auroc_value <= 1 and f"ood auroc vs {noise_folder}" in stdout
    report = result["details"]["ood"]
    assert report["in_distribution"]["num_examples"] == 30
    assert report["out_of_distribution"][str(noise_folder)]["num_examples"] == 12
    assert report["out_of_distribution"][str(noise_folder)]["auroc"] == auroc_value
    assert result["settings"]["heldout"]["spec"] == "digits-test"
    assert [ref["kind"] for ref in result["settings"]["ood"]] == ["folder"]


# ------------------------------------------------------------------ cdrl.evaluation.ood


def test_auroc_is_the_mann_whitney_statistic():
    generator = torch.Generator().manual_seed(0)
    energy_in = torch.randint(0, 6, (40,), generator=generator).double()  # many ties
    energy_out = torch.randint(2, 9, (30,), generator=generator).double()
    lower = (energy_in[:, None] < energy_out[None]).double()
    ties = (energy_in[:, None] == energy_out[None]).double()
    expected = (lower + 0.5 * ties).mean().item()
    assert auroc(energy_in, energy_out) == pytest.approx(expected)
    assert auroc(torch.zeros(3), torch.ones(2)) == 1.0  # in-distribution lower: perfect
    assert auroc(torch.ones(3), torch.zeros(2)) == 0.0
    assert auroc(energy_in, energy_in) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one"):
        auroc(energy_in, torch.zeros(0))
    with pytest.raises(FloatingPointError):
        auroc(torch.tensor([float("nan")]), torch.zeros(1))


def test_lowest_level_energy_is_the_level_0_ebm_on_scaled_data(uncond_pipe):
    x0 = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    energy = lowest_level_energy(uncond_pipe, x0, batch_size=2)
    schedule = uncond_pipe.scheduler.schedule
    scale = float(schedule.y_scales[0])
    assert scale == pytest.approx(float(schedule.alphas[1]) ** 0.5) and scale < 1
    with torch.no_grad():
        direct = uncond_pipe.ebm(x0 * scale, torch.full((5,), float(schedule.noise_levels[0])))
    assert energy.dtype == torch.float64 and energy.shape == (5,)
    assert_close_float32(energy, direct.double())  # batches of 2 against one of 5
    # float32 energies held as float64: another batch size (or x0 / 2 * 2) may round differently.
    assert_close_float32(energy, lowest_level_energy(uncond_pipe, x0, batch_size=5))
    # The data scale multiplies the data before the EBM sees them.
    scaled = _build_pipeline((), data_scale=2.0)
    assert_close_float32(lowest_level_energy(scaled, x0 / 2), energy)


def test_lowest_level_energy_of_a_conditional_model_uses_the_null_label(cond_pipe):
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    schedule = cond_pipe.scheduler.schedule
    levels = torch.full((3,), float(schedule.noise_levels[0]))
    null = torch.full((3, 1), NUM_CLASSES)
    with torch.no_grad():
        # the EBM itself on the null label (not cdrl.guidance.composed, which the code under test uses)
        expected = cond_pipe.ebm(x0 * float(schedule.y_scales[0]), levels, null)
        labelled = cond_pipe.ebm(
            x0 * float(schedule.y_scales[0]), levels, torch.zeros(3, 1, dtype=torch.long)
        )
    energy = lowest_level_energy(cond_pipe, x0)
    torch.testing.assert_close(energy, expected.double(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(energy, labelled.double())


def test_ood_report_scores_low_energy_as_in_distribution(monkeypatch):
    # An EBM whose energy is |y|^2 / 2: data near 0 are in-distribution, data far from 0 are not.
    pipe = _build_pipeline(())
    monkeypatch.setattr(
        pipe.ebm, "forward", lambda y, noise_level, cond=None: 0.5 * y.pow(2).flatten(1).sum(1)
    )
    generator = torch.Generator().manual_seed(3)
    x_in = torch.rand(16, 1, 8, 8, generator=generator) * 0.2 - 0.1
    x_far = torch.rand(9, 1, 8, 8, generator=generator) * 0.2 + 0.8
    x_mixed = torch.cat([x_in[:4], x_far[:4]])
    report = ood_report(pipe, x_in, {"far": x_far, "self": x_in, "mixed": x_mixed}, batch_size=7)
    assert report["in_distribution"]["num_examples"] == 16
    far, self_, mixed = (report["out_of_distribution"][k] for k in ("far", "self", "mixed"))
    assert far["auroc"] == 1.0 and far["num_examples"] == 9
    assert far["energy_mean"] > report["in_distribution"]["energy_mean"]
    assert self_["auroc"] == pytest.approx(0.5)
    assert self_["energy_mean"] == pytest.approx(report["in_distribution"]["energy_mean"])
    assert 0.5 < mixed["auroc"] < 1.0
    json.dumps(report)


# ------------------------------------------------------------------ several processes

# Under torchrun every process runs this: sample_images on its share (rank 0 saves the gathered set),
# then the CLI itself.
DRIVER = """
import sys

import torch
from accelerate import PartialState

from cdrl.export import load_pipeline
from cdrl.cli.evaluate import main
from cdrl.evaluation.fidelity import sample_images

checkpoint, saved, *argv = sys.argv[1:]
state = PartialState(cpu=True)
pipe = load_pipeline(checkpoint, "cpu")
labels, seeds = [3, 1, 4, 1, 5, 9, 2], list(range(10, 17))
images = sample_images(pipe, labels, seeds, guidance_scale=2.0, batch_size=2, state=state)
assert (images is None) == (state.process_index != 0)
if state.is_main_process:
    torch.save(images, saved)
sys.exit(main(argv))
"""


@pytest.mark.slow
def test_two_processes_give_the_samples_and_figures_of_one(
    cond_pipe, cond_checkpoint, weights, tmp_path, capsys
):
    """torchrun, 2 CPU processes (gloo; accelerate launch runs torchrun on GPUs): split, then gathered in order."""
    args = ["--checkpoint", str(cond_checkpoint), "--all_classes", "--num_samples", "9"]
    args += [
        "--reference",
        "digits-test",
        "--metrics",
        "fid",
        "isc",
        "accuracy",
        "--batch_size",
        "4",
    ]
    args += ["--digits_classifier", str(weights), "--guidance_scale", "1.5"]
    code, _, stderr = _run([*args, "--output", tmp_path / "one.json"], capsys)
    assert code == 0, stderr
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # accelerate uses gloo on the CPU only when told to (accelerate launch --cpu sets this)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [str(driver), str(cond_checkpoint), str(tmp_path / "images.pt"), *args]
    cmd += ["--output", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only the main process computes and writes
    gathered = torch.load(tmp_path / "images.pt")
    expected = sample_images(
        cond_pipe, [3, 1, 4, 1, 5, 9, 2], list(range(10, 17)), guidance_scale=2.0
    )
    # every sample once, in order (other processes and batch splits: a pixel may round one level off)
    assert_uint8_close(gathered, expected)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["settings"]["num_processes"] == 2 and one["settings"]["num_processes"] == 1
    # The figures of the same images, whose features were computed in another process (float32
    # rounding); looser should a pixel have rounded one level off.
    rel = 1e-5 if torch.equal(gathered, expected) else 1e-2
    _assert_json_close(two["metrics"], one["metrics"], rel)
    _assert_json_close(two["details"], one["details"], rel)


def _assert_json_close(actual, expected, rel: float) -> None:
    """JSON values equal, floats within ``rel``, recursively."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_json_close(actual[key], expected[key], rel)
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected, strict=True):
            _assert_json_close(a, b, rel)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=rel, abs=1e-9)
    else:
        assert actual == expected


def test_ood_sets_script_writes_inverted_digits_and_noise(tmp_path, capsys):
    from experiment_scripts import load_experiment
    from PIL import Image

    from cdrl.evaluation.digits import digits_split

    ood_sets = load_experiment("ood_sets")
    assert ood_sets.main(["--output_dir", str(tmp_path), "--num", "5"]) == 0
    inverted = sorted((tmp_path / "inverted").glob("*.png"))
    noise = sorted((tmp_path / "noise").glob("*.png"))
    assert len(inverted) == len(noise) == 5
    first = np.asarray(Image.open(inverted[0]))
    digit = digits_split()[2][0, 0].numpy()
    assert first.shape == (8, 8) and first.dtype == np.uint8
    # bit-exact: digits are k/16, so (d + 1) / 2 * 255 = k * 255 / 32 is never within 1/32 of a .5
    np.testing.assert_array_equal(first, 255 - np.rint((digit + 1) / 2 * 255).astype(np.uint8))
    pixels = np.stack([np.asarray(Image.open(p)) for p in noise])
    assert pixels.std() > 50  # uniform noise, not a constant image
    # bad input: one line, exit code 2, nothing written
    assert (
        ood_sets.run_cli(ood_sets.main, ["--output_dir", str(tmp_path / "bad"), "--num", "0"]) == 2
    )
    assert "--num must be >= 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_bpd_convergence_from_the_cli(uncond_checkpoint, tmp_path, capsys):
    """--bpd_convergence: both figures with their standard errors, the relative change and the verdict
    in the JSON and the summary; the reported bpd is the 4K figure; the stages say what they do."""
    out = tmp_path / "conv.json"
    argv = ["--checkpoint", uncond_checkpoint, "--metrics", "bpd", "--heldout", "digits-test"]
    argv += ["--num_examples", 3, "--bpd_num_chains", 2, "--bpd_num_intermediate", 2]
    code, stdout, stderr = _run([*argv, "--bpd_convergence", "--output", out], capsys)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    conv = result["details"]["bpd_convergence"]
    assert conv["num_intermediate"] == [2, 8] and conv["tolerance"] == 0.01
    for key in ("bpd", "bpd_stderr", "nll_nats", "nll_stderr_nats", "per_level_nats"):
        assert len(conv[key]) == 2, key
    assert isinstance(conv["converged"], bool) and conv["relative_change"] >= 0
    assert "1%" in conv["criterion"] and "paired_stderr_nats" in conv
    metrics = result["metrics"]
    assert set(metrics) == {"bpd", "nll_nats", "bpd_stderr", "bpd_converged"}
    assert metrics["bpd"] == conv["bpd"][1] and metrics["bpd_stderr"] == conv["bpd_stderr"][1]
    assert metrics["bpd_converged"] == conv["converged"]
    details = result["details"]["bpd"]
    assert details["num_intermediate"] == 8 and details["num_bins"] == 17
    assert details["num_examples"] == 3 and "nll_per_example" not in details
    assert "at K = 8" in stdout and "at K = 2" in stdout and "converged" in stdout
    assert "bits/dim: 3 examples" in stderr and "energy gradients" in stderr and "4x" in stderr
    assert "bits/dim (K = 2):" in stderr and "bits/dim (K = 8):" in stderr  # the progress bars


def test_bpd_defaults_are_the_sized_ones_and_help_states_the_cost(capsys):
    import cdrl.evaluation.bpd as lk

    steps, chains = lk.DEFAULT_NUM_INTERMEDIATE, lk.DEFAULT_NUM_CHAINS
    defaults = lk.bits_per_dim.__kwdefaults__
    assert (defaults["num_intermediate"], defaults["num_chains"]) == (steps, chains)
    text = " ".join(evaluate.build_parser().format_help().split())
    assert f"(default {steps})" in text and f"(default {chains})" in text
    assert "examples x (levels - 1) x chains x K" in text and "min on 2 CPU cores" in text
    assert "--bpd_convergence" in text and "costs 4x" in text


def test_first_training_of_the_classifier_says_what_it_does(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_train(**kwargs):
        calls.append(kwargs)
        return dc.DigitsClassifier()

    monkeypatch.setattr(dc, "train_digits_classifier", fake_train)
    dc.load_digits_classifier(tmp_path / "clf")
    err = capsys.readouterr().err
    assert calls == [{"progress": True}]
    assert "training one" in err and "about" in err and "trained the digits classifier in" in err
    dc.load_digits_classifier(tmp_path / "clf")  # cached: no training, no words
    assert len(calls) == 1 and capsys.readouterr().err == ""


def test_ood_report_shows_a_progress_bar(uncond_pipe, capsys):
    x = torch.zeros(3, 1, 8, 8)
    ood_report(uncond_pipe, x, {"noise": x + 0.5}, batch_size=2)
    assert "ood energies" in capsys.readouterr().err
    ood_report(uncond_pipe, x, {"noise": x + 0.5}, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""
