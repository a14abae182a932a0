"""Tests of class-conditional generation: the cdrl.cli.generate CLI, guidance, the guidance sweep."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_uint8_close
from experiment_scripts import load_experiment
from PIL import Image

from cdrl.cli import generate
from cdrl.evaluation.digits import digits_split
from cdrl.guidance import Conditioning
from cdrl.models import EnergyResNet, InitializerUNet
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.sampling import energy_fn, level, sample
from cdrl.utils import randn_like

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


def _build_pipeline(condition_sizes: tuple[int, ...]) -> CDRLPipeline:
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
    # The initializer's output layer is zero-initialized (mu(x, c) = x for every c): give it small
    # random weights so that its conditioning, and guidance of its mean, matter too.
    with torch.no_grad():
        for param in initializer.parameters():
            if param.abs().max() == 0:
                param.copy_(0.05 * torch.randn(param.shape))
    pipe = CDRLPipeline(ebm=ebm, initializer=initializer, scheduler=CDRLScheduler(n_steps=2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cond_pipe() -> CDRLPipeline:
    """A tiny class-conditional (10 classes) 8x8 one-channel pipeline, K = 2."""
    return _build_pipeline((NUM_CLASSES,))


@pytest.fixture(scope="module")
def cond_checkpoint(cond_pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cond") / "pipeline"
    cond_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def uncond_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("uncond") / "pipeline"
    _build_pipeline(()).save_pretrained(path)
    return path


def _generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = generate.main([str(a) for a in argv] + ["--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------ the CLI, end to end


def test_grid_png_has_one_row_per_class(cond_checkpoint, tmp_path, capsys):
    out = tmp_path / "grids" / "grid.png"
    argv = ["--checkpoint", cond_checkpoint, "--class_labels", 3, 7, "--num_samples_per_class", 3]
    code, stdout, _ = _run([*argv, "--guidance_scale", 2, "--output", out], capsys)
    assert code == 0 and "wrote 6 samples" in stdout
    # 8x8 tiles, 1 px padding, upscaled 4x to 32 px tiles: 3 columns, 2 rows.
    assert Image.open(out).size == ((3 * 9 + 1) * 4, (2 * 9 + 1) * 4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png"]  # no temporaries left


def test_folder_with_manifest_from_a_run_folder(cond_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cond_checkpoint, run / "pipeline")  # a run folder holding pipeline/
    out = tmp_path / "samples"
    argv = ["--checkpoint", run, "--all_classes", "--num_samples_per_class", 2, "--seed", 5]
    code, _, _ = _run(
        [*argv, "--guidance_scale", 1.5, "--num_langevin_steps", 1, "--output", out], capsys
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    samples = manifest["samples"]
    assert [s["label"] for s in samples] == [c for c in range(NUM_CLASSES) for _ in range(2)]
    assert [s["seed"] for s in samples] == list(range(5, 5 + 2 * NUM_CLASSES))
    assert {s["guidance_scale"] for s in samples} == {1.5}
    assert manifest["num_langevin_steps"] == 1
    # our ownership marker makes the folder replaceable by a later run; nothing else is in it
    assert sorted(p.name for p in out.iterdir()) == [".cdrl-output"] + [
        f"{k:06d}.png" for k in range(20)
    ] + ["manifest.json"]
    image = Image.open(out / "000000.png")
    assert image.size == (8, 8) and image.mode == "L"

    # Writing again into a previous output folder replaces it.
    code, _, _ = _run([*argv, "--output", out], capsys)
    assert code == 0 and json.loads((out / "manifest.json").read_text())["guidance_scale"] == 1.0


def test_unconditional_sampling_of_a_conditional_model(cond_checkpoint, tmp_path, capsys):
    out = tmp_path / "uncond"
    code, _, _ = _run(
        ["--checkpoint", cond_checkpoint, "--num_samples", 3, "--output", out], capsys
    )
    assert code == 0
    samples = json.loads((out / "manifest.json").read_text())["samples"]
    assert [(s["label"], s["seed"], s["guidance_scale"]) for s in samples] == [
        (None, k, None) for k in range(3)
    ]


def test_samples_do_not_depend_on_batch_size(cond_checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", cond_checkpoint, "--class_labels", 1, 2, 3, 4, 5, "--guidance_scale", 2]
    for batch_size in (1, 4):
        code, _, _ = _run(
            [*argv, "--batch_size", batch_size, "--output", tmp_path / f"b{batch_size}"], capsys
        )
        assert code == 0
    # The same samples, computed in batches of another size: float32 may round a pixel that sits a
    # hair from a level boundary the other way, so one level on a few pixels is allowed.
    names = [f"{k:06d}.png" for k in range(5)]
    b1, b4 = (
        torch.from_numpy(np.stack([_pixels(tmp_path / b / name) for name in names]))
        for b in ("b1", "b4")
    )
    assert_uint8_close(b1, b4)
    assert (tmp_path / "b1/manifest.json").read_text() == (
        tmp_path / "b4/manifest.json"
    ).read_text()


def test_shim_exits_with_the_code_of_main(cond_checkpoint, tmp_path, monkeypatch, capsys):
    # generate.py calls sys.exit(main()); main() with no argv parses sys.argv (as a console script).
    out = tmp_path / "x.png"
    argv = ["--checkpoint", str(cond_checkpoint), "--class_labels", "12", "--output", str(out)]
    monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    assert exit_info.value.code == 2
    error = "error: class label 12 is outside [0, 10) for this checkpoint"
    assert capsys.readouterr().err.splitlines() == [error]
    assert not out.exists()


# ------------------------------------------------------------------ guidance equivalences


def test_scale_one_is_plain_conditional_sampling(cond_pipe):
    labels = [0, 3, 9]
    images = cond_pipe(
        class_labels=labels, guidance_scale=1.0, generator=_generators(3), output_type="pt"
    ).images

    # The same chain by hand: x_T from the per-sample generators, which then drive the chain.
    schedule, settings = cond_pipe.scheduler.schedule, cond_pipe.scheduler.langevin_settings()
    cond = torch.tensor(labels)[:, None]
    null = torch.full_like(cond, NUM_CLASSES)
    for conditioning in (Conditioning(null, ((cond, 1.0),)), Conditioning(null=cond)):
        generators = _generators(3)
        x_top = randn_like(torch.empty(3, 1, 8, 8), generators)
        x = sample(
            cond_pipe.ebm,
            cond_pipe.initializer,
            schedule,
            x_top,
            settings,
            generator=generators,
            cond=conditioning,
        )
        # Bit for bit: weight 1 evaluates only the conditional network (no null pass), exactly as a
        # plain conditional model with no guidance machinery.
        assert torch.equal(images, (x.clamp(-1, 1) + 1) / 2)


def test_scale_zero_is_null_label_sampling(cond_pipe):
    labels = [0, 3, 9]
    guided = cond_pipe(
        class_labels=labels, guidance_scale=0.0, generator=_generators(3), output_type="pt"
    )
    null = cond_pipe(batch_size=3, generator=_generators(3), output_type="pt")
    conditional = cond_pipe(class_labels=labels, generator=_generators(3), output_type="pt")
    # Scale 0 gives out(null) + 0 * (out(c) - out(null)) = out(null) exactly, but here out(null)
    # comes from one batched forward over [null; cond] (2b samples), which rounds differently in
    # float32 from the b-sample forward of plain null-label sampling: equal up to that rounding
    # (about 1e-6 after the whole chain), not bit for bit.
    torch.testing.assert_close(guided.images, null.images, rtol=0, atol=1e-5)
    assert not torch.allclose(conditional.images, null.images, atol=1e-3)  # labels do matter


@pytest.mark.parametrize("guidance_scale", [1.7, 3.0])
def test_guided_energy_gradient(cond_pipe, monkeypatch, guidance_scale):
    """guidance_scale S gives grad E_w = (1 + w) grad E(c) - w grad E(null), with w = S - 1."""
    import cdrl.pipeline

    captured = {}

    def spy(*args, **kwargs):
        captured.update(kwargs)
        return args[3]  # x_top

    monkeypatch.setattr(cdrl.pipeline, "sample", spy)
    labels = torch.tensor([1, 4, 7])
    cond_pipe(
        class_labels=labels,
        guidance_scale=guidance_scale,
        generator=_generators(3),
        output_type="pt",
    )
    null, terms = captured["cond"].null, captured["cond"].terms

    settings = cond_pipe.scheduler.langevin_settings()
    lvl = level(cond_pipe.scheduler.schedule, torch.tensor([0, 2, 5]), settings)
    y = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def grad_of(fn):
        leaf = y.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
        return grad

    w = guidance_scale - 1
    guided = grad_of(energy_fn(cond_pipe.ebm, lvl, null=null, terms=terms))
    g_cond = grad_of(energy_fn(cond_pipe.ebm, lvl, null=labels[:, None]))
    g_null = grad_of(energy_fn(cond_pipe.ebm, lvl, null=torch.full((3, 1), NUM_CLASSES)))
    torch.testing.assert_close(guided, (1 + w) * g_cond - w * g_null, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, g_cond, atol=1e-4)  # guidance changed the drift


# ------------------------------------------------------------------ bad input


BAD_INPUT_CASES = [
    "jpg output",
    "folder of other files",
    "label too large",
    "negative label",
    "negative guidance",
    "labels, unconditional model",
    "all classes, unconditional model",
    "missing checkpoint",
    "no model_index.json",
    "no ebm weights",
    "no scheduler",
    "parent is a file",
    "folder under a file",
    "unwritable system path",
    "guidance without labels",
    "num_samples with labels",
    "zero per class",
    "labels and all classes",
    "unknown flag",
]


def _bad_inputs(cond: Path, uncond: Path, tmp: Path) -> dict[str, list]:
    (tmp / "a_file").write_text("")
    empty = tmp / "empty"
    empty.mkdir()
    no_weights = tmp / "no_weights"
    shutil.copytree(cond, no_weights)
    (no_weights / "ebm" / "diffusion_pytorch_model.safetensors").unlink()
    no_scheduler = tmp / "no_scheduler"
    shutil.copytree(cond, no_scheduler)
    shutil.rmtree(no_scheduler / "scheduler")
    other = tmp / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    out = tmp / "out" / "grid.png"
    return {
        "jpg output": ["--checkpoint", cond, "--class_labels", 1, "--output", tmp / "g.jpg"],
        "folder of other files": ["--checkpoint", cond, "--class_labels", 1, "--output", other],
        "label too large": ["--checkpoint", cond, "--class_labels", 3, 10, "--output", out],
        "negative label": ["--checkpoint", cond, "--class_labels", -1, "--output", out],
        "negative guidance": [
            "--checkpoint",
            cond,
            "--all_classes",
            "--guidance_scale",
            -0.5,
            "--output",
            out,
        ],
        "labels, unconditional model": [
            "--checkpoint",
            uncond,
            "--class_labels",
            1,
            "--output",
            out,
        ],
        "all classes, unconditional model": [
            "--checkpoint",
            uncond,
            "--all_classes",
            "--output",
            out,
        ],
        "missing checkpoint": ["--checkpoint", tmp / "nowhere", "--output", out],
        "no model_index.json": ["--checkpoint", empty, "--output", out],
        "no ebm weights": ["--checkpoint", no_weights, "--class_labels", 1, "--output", out],
        "no scheduler": ["--checkpoint", no_scheduler, "--class_labels", 1, "--output", out],
        "parent is a file": [
            "--checkpoint",
            cond,
            "--class_labels",
            1,
            "--output",
            tmp / "a_file" / "g.png",
        ],
        "folder under a file": [
            "--checkpoint",
            cond,
            "--class_labels",
            1,
            "--output",
            tmp / "a_file" / "d",
        ],
        "unwritable system path": ["--checkpoint", cond, "--output", "/proc/cdrl-test/grid.png"],
        "guidance without labels": ["--checkpoint", cond, "--guidance_scale", 2, "--output", out],
        "num_samples with labels": [
            "--checkpoint",
            cond,
            "--all_classes",
            "--num_samples",
            4,
            "--output",
            out,
        ],
        "zero per class": [
            "--checkpoint",
            cond,
            "--all_classes",
            "--num_samples_per_class",
            0,
            "--output",
            out,
        ],
        "labels and all classes": [
            "--checkpoint",
            cond,
            "--class_labels",
            1,
            "--all_classes",
            "--output",
            out,
        ],
        "unknown flag": ["--checkpoint", cond, "--bogus", "--output", out],
    }


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_exit_2_and_no_output(
    cond_checkpoint, uncond_checkpoint, tmp_path, capsys, case
):
    argv = _bad_inputs(cond_checkpoint, uncond_checkpoint, tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = _run(argv, capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert stdout == ""
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the output's parent


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="root can write into read-only folders"
)
def test_read_only_output_folder(cond_checkpoint, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, stderr = _run(
            ["--checkpoint", cond_checkpoint, "--class_labels", 1, "--output", locked / "g.png"],
            capsys,
        )
    finally:
        locked.chmod(0o755)
    assert code == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    assert list(locked.iterdir()) == []


def test_failure_while_generating_leaves_nothing(cond_checkpoint, tmp_path, capsys, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    original = CDRLPipeline.__call__
    monkeypatch.setattr(CDRLPipeline, "__call__", failing)
    out = tmp_path / "samples"
    with pytest.raises(RuntimeError, match="out of memory"):
        generate.main(
            [
                "--checkpoint",
                str(cond_checkpoint),
                "--all_classes",
                "--batch_size",
                "4",
                "--output",
                str(out),
                "--device",
                "cpu",
            ]
        )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the guidance sweep


def test_measure_on_real_digits(classifier):
    sweep = load_experiment("guidance_sweep")
    _, _, x_test, y_test = digits_split()
    real = sweep.measure(x_test, y_test, classifier)
    json.dumps(real)
    assert real["num_samples"] == 360
    assert real["accuracy"] >= 0.95 and real["confident_accuracy"] <= real["accuracy"]
    assert min(real["per_class_accuracy"].values()) >= 0.8
    assert sorted(real["per_class_diversity"]) == [str(c) for c in range(NUM_CLASSES)]
    assert 1.0 < real["diversity"] < 20.0

    # Wrong labels: accuracy ~0; one repeated image per class: diversity 0.
    assert sweep.measure(x_test, (y_test + 1) % 10, classifier)["accuracy"] <= 0.05
    first = torch.stack([x_test[y_test == c][0] for c in range(NUM_CLASSES)])
    copies = sweep.measure(
        first.repeat_interleave(3, 0), torch.arange(10).repeat_interleave(3), classifier
    )
    assert copies["diversity"] == 0.0


def test_sweep_end_to_end(cond_checkpoint, uncond_checkpoint, classifier, tmp_path, capsys):
    sweep = load_experiment("guidance_sweep")
    classifier.save_pretrained(tmp_path / "clf")
    out = tmp_path / "sweep"
    argv = [
        "--checkpoint",
        cond_checkpoint,
        "--guidance_scales",
        1,
        3,
        "--num_samples_per_class",
        2,
    ]
    argv += ["--classifier", tmp_path / "clf", "--output_dir", out, "--device", "cpu"]
    assert sweep.main([str(a) for a in argv]) == 0
    result = json.loads((out / "guidance_sweep.json").read_text())
    assert [r["guidance_scale"] for r in result["results"]] == [1.0, 3.0]
    assert [r["w"] for r in result["results"]] == [0.0, 2.0]
    assert result["results"][0]["metrics"]["num_samples"] == 20
    assert result["real_test_digits"]["accuracy"] >= 0.95
    assert (out / "guidance_sweep.md").read_text().count("\n") == 2 + 2 + 1
    assert Image.open(out / "guidance_sweep.png").format == "PNG"
    assert (out / "samples_scale3.png").is_file()

    argv = [
        "--checkpoint",
        str(uncond_checkpoint),
        "--output_dir",
        str(tmp_path / "x"),
        "--device",
        "cpu",
    ]
    capsys.readouterr()
    assert sweep.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "x").exists()
