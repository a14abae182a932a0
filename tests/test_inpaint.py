"""Tests of inpainting: mask presets, the pipeline's known-pixel constraint, the ``cdrl-inpaint``
CLI end to end and on bad input, and the measurements of experiments/inpaint_digits.py.

Mask convention everywhere: 1 / white = repaint, 0 / black = keep.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from experiment_scripts import load_experiment
from PIL import Image

from cdrl.cli import inpaint
from cdrl.cli.inpaint import main
from cdrl.generation import MASK_PRESETS, preset_mask
from cdrl.models import EnergyResNet, InitializerUNet
from cdrl.pipeline import CDRLPipeline, CDRLScheduler

ROOT = Path(__file__).resolve().parents[1]
SIZE = 8


def build_pipeline(condition_sizes: tuple[int, ...] = (), seed: int = 0) -> CDRLPipeline:
    """The tiny 8x8 one-channel pipeline of the brief (T = 6 levels, K = 2 Langevin steps)."""
    torch.manual_seed(seed)
    ebm = EnergyResNet(
        in_channels=1,
        sample_size=SIZE,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        condition_sizes=condition_sizes,
    ).eval()
    initializer = InitializerUNet(
        in_channels=1,
        sample_size=SIZE,
        block_out_channels=(8, 16),
        attention_levels=(False, True),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        condition_sizes=condition_sizes,
    ).eval()
    # Give the zero-initialized output layers small weights so the proposal is not the identity.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in initializer.parameters():
            if param.abs().max() == 0:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    pipeline = CDRLPipeline(ebm=ebm, initializer=initializer, scheduler=CDRLScheduler(n_steps=2))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """save_pretrained folders of an unconditional and a 10-class conditional tiny pipeline."""
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for name, sizes in (("uncond", ()), ("cond", (10,))):
        folders[name] = root / name
        build_pipeline(sizes).save_pretrained(folders[name])
    return folders


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _images(folder: Path, count: int = 2, size: int = SIZE, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [
        _write(folder / f"digit{i}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
        for i in range(count)
    ]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# ---------------------------------------------------------------- presets and the pipeline


def test_preset_masks():
    left = preset_mask("left_half", SIZE)
    assert left.shape == (SIZE, SIZE) and left.dtype == np.float32
    assert left[:, :4].all() and not left[:, 4:].any()
    assert (preset_mask("right_half", SIZE) == 1 - left).all()
    top = preset_mask("top_half", SIZE)
    assert top[:4].all() and not top[4:].any()
    assert (preset_mask("bottom_half", SIZE) == 1 - top).all()
    center = preset_mask("center", SIZE)
    assert center[2:6, 2:6].all() and center.sum() == 16
    boxes = [preset_mask("random_boxes", 16, rng=np.random.default_rng(s)) for s in (0, 0, 1)]
    assert (boxes[0] == boxes[1]).all() and (boxes[0] != boxes[2]).any()
    for mask in boxes:
        assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.mean() < 1
    with pytest.raises(ValueError, match="unknown mask preset"):
        preset_mask("everything", SIZE)


@pytest.mark.parametrize("preset", MASK_PRESETS)
def test_pipeline_keeps_known_pixels(preset):
    pipeline = build_pipeline()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (2, 1, SIZE, SIZE), dtype=np.uint8)
    image = torch.from_numpy(pixels).float() / 255  # (2, 1, 8, 8) in [0, 1]
    repaint = torch.from_numpy(preset_mask(preset, SIZE, rng=rng))
    generators = [torch.Generator().manual_seed(k) for k in range(4)]
    out = pipeline(
        image=image,
        mask_image=repaint.expand(2, 1, -1, -1),
        num_samples_per_image=2,
        generator=generators,
        output_type="pt",
    ).images  # (4, 1, 8, 8) in [0, 1]
    keep = (repaint == 0).expand_as(out)
    expected = image.repeat_interleave(2, 0)
    assert torch.allclose(out[keep], expected[keep], atol=1e-6)
    assert (out[~keep] - expected[~keep]).abs().max() > 0.01  # the hole was repainted
    # Through 8-bit PNG values the kept pixels come back exactly.
    quantized = (out * 255).round().to(torch.uint8).numpy()
    assert (quantized[keep.numpy()] == pixels.repeat(2, 0)[keep.numpy()]).all()


def test_resampling_keeps_known_pixels_and_repeats_each_level():
    """RePaint resampling: (1 + r) passes per level, known pixels still exact, and a different result."""
    pipeline = build_pipeline()
    image = torch.rand(2, 1, SIZE, SIZE)
    repaint = torch.from_numpy(preset_mask("left_half", SIZE)).expand(2, 1, -1, -1)
    steps = {}
    outs = {}
    for r in (0, 2):
        calls = []
        original = pipeline.progress_bar

        def counting_bar(*args, calls=calls, original=original, **kwargs):
            bar = original(*args, **kwargs)
            calls.append(kwargs.get("total"))
            return bar

        pipeline.progress_bar = counting_bar
        outs[r] = pipeline(
            image=image,
            mask_image=repaint,
            resample=r,
            generator=[torch.Generator().manual_seed(k) for k in range(2)],
            output_type="pt",
        ).images
        pipeline.progress_bar = original
        steps[r] = calls[0]
        keep = (repaint == 0).expand_as(outs[r])
        assert torch.allclose(outs[r][keep], image[keep], atol=1e-6)
    assert steps[2] == 3 * steps[0]
    assert (outs[2] - outs[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="resample must be >= 0"):
        pipeline(image=image, mask_image=repaint, resample=-1, output_type="pt")


def test_resampling_renoises_with_one_forward_step():
    """A resampling pass feeds reverse_step x_{t+1} = sqrt(alpha_{t+1}) x_t + sigma_{t+1} eps."""
    from cdrl import sampling

    pipeline = build_pipeline()
    schedule = pipeline.scheduler.schedule
    seen = []

    def fake_step(ebm, initializer, schedule_, x_next, t, settings, **kwargs):
        seen.append((t, x_next.clone()))
        return torch.full_like(x_next, float(t + 1))  # x_t = t + 1 everywhere

    original = sampling.reverse_step
    sampling.reverse_step = fake_step
    try:
        settings = pipeline.scheduler.langevin_settings(tweedie=False)
        torch.manual_seed(0)
        sampling.sample(
            pipeline.ebm, pipeline.initializer, schedule, torch.zeros(4000, 1), settings, resample=1
        )
    finally:
        sampling.reverse_step = original
    levels = [t for t, _ in seen]
    assert levels == [t for t in reversed(range(schedule.num_levels)) for _ in range(2)]
    top = schedule.num_levels - 1
    for (t, first), (_, x_next) in zip(seen[0::2], seen[1::2], strict=True):
        # the first pass continues from the level above (which returned t + 2); the top from x_T = 0
        assert torch.all(first == (0.0 if t == top else float(t + 2)))
        alpha = float(schedule.alphas[t + 1])
        assert abs(x_next.mean().item() - alpha**0.5 * (t + 1)) < 0.05
        assert abs(x_next.std().item() - (1 - alpha) ** 0.5) < 0.05


# ---------------------------------------------------------------- the CLI


def test_cli_end_to_end(tmp_path, checkpoints, capsys):
    paths = _images(tmp_path / "in", count=2)
    out = tmp_path / "out"
    code, stdout, err = _run(
        capsys,
        "--checkpoint",
        checkpoints["uncond"],
        "--image",
        tmp_path / "in",
        "--mask_preset",
        "left_half",
        "--num_samples",
        3,
        "--seed",
        5,
        "--output",
        out,
    )
    assert code == 0, err
    assert err == "" and "wrote 2 panels and 6 completions" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mask_convention"].startswith("mask 1 / white = repaint")
    assert manifest["panel_columns"][:3] == ["input", "mask (white = repaint)", "masked input"]
    assert len(manifest["items"]) == 2 and not list(tmp_path.glob(".tmp-*"))
    mask = preset_mask("left_half", SIZE).astype(bool)
    for index, (path, item) in enumerate(zip(paths, manifest["items"], strict=True)):
        assert item["image"] == str(path) and item["resized"] is False
        assert [c["seed"] for c in item["completions"]] == [5 + 3 * index + j for j in range(3)]
        source = _read(path)
        for completion in item["completions"]:
            pixels = _read(out / completion["file"])
            assert pixels.shape == (SIZE, SIZE) and pixels.dtype == np.uint8
            assert (pixels[~mask] == source[~mask]).all()  # kept exactly, through PNG
            assert (pixels[mask] != source[mask]).any()
        # input | mask | masked | 3 completions, 64-pixel tiles, 2-pixel separators
        panel = _read(out / item["panel"])
        assert panel.shape == (64, 6 * 64 + 5 * 2)
        assert (panel[:, 66:130][:, :32] == 255).all() and (panel[:, 66:130][:, 32:] == 0).all()
        assert (panel[:, :64][::8, ::8] == source).all()


def test_cli_mask_files_batch_independence_and_rerun(tmp_path, checkpoints, capsys):
    paths = _images(tmp_path / "in", count=2)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, 5:] = 255
    single = _write(tmp_path / "mask.png", mask)
    outputs = []
    for batch_size, name in ((1, "a"), (64, "b")):
        code, _, err = _run(
            capsys,
            "--checkpoint",
            checkpoints["uncond"],
            "--image",
            *paths,
            "--mask",
            single,
            "--num_samples",
            2,
            "--batch_size",
            batch_size,
            "--output",
            tmp_path / name,
        )
        assert code == 0, err
        outputs.append(tmp_path / name)
    for file in sorted((outputs[0] / "completions").iterdir()):
        assert (_read(file) == _read(outputs[1] / "completions" / file.name)).all()
    # One mask per image (a JPEG image, a 1-bit mask); an earlier output folder is replaced.
    rgb = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    jpeg = _write(tmp_path / "photo.jpg", rgb)
    bit = _write(tmp_path / "bit.png", mask > 0, mode=None)
    code, _, err = _run(
        capsys,
        "--checkpoint",
        checkpoints["uncond"],
        "--image",
        paths[0],
        jpeg,
        "--mask",
        single,
        bit,
        "--num_samples",
        1,
        "--output",
        outputs[0],
    )
    assert code == 0, err
    assert "notice: converted colour image" in err and str(jpeg) in err
    manifest = json.loads((outputs[0] / "manifest.json").read_text())
    assert [item["mask"] for item in manifest["items"]] == [str(single), str(bit)]
    assert len(list((outputs[0] / "completions").iterdir())) == 2


def test_cli_conditional(tmp_path, checkpoints, capsys):
    paths = _images(tmp_path / "in", count=1)
    code, _, err = _run(
        capsys,
        "--checkpoint",
        checkpoints["cond"],
        "--image",
        *paths,
        "--mask_preset",
        "center",
        "--class_label",
        3,
        "--guidance_scale",
        2.0,
        "--num_samples",
        2,
        "--output",
        tmp_path / "o",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "o/manifest.json").read_text())["class_label"] == 3


def test_cli_resize_notice(tmp_path, checkpoints, capsys):
    big = np.random.default_rng(2).integers(0, 256, (16, 24), dtype=np.uint8)
    image = _write(tmp_path / "big.png", big)
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[8:] = 255
    mask_path = _write(tmp_path / "big_mask.png", mask)
    code, _, err = _run(
        capsys,
        "--checkpoint",
        checkpoints["uncond"],
        "--image",
        image,
        "--mask",
        mask_path,
        "--num_samples",
        1,
        "--output",
        tmp_path / "out",
    )
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("notice: resized image")
    assert str(image) in lines[0] and "24x16 to 8x8" in lines[0] and "aspect ratio" in lines[0]
    item = json.loads((tmp_path / "out/manifest.json").read_text())["items"][0]
    assert item["resized"] is True and item["original_size"] == [24, 16]
    assert item["repaint_fraction"] == 0.5
    assert _read(tmp_path / "out" / item["completions"][0]["file"]).shape == (SIZE, SIZE)


def test_help_states_mask_convention(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("1 / white = repaint, 0 / black = keep") >= 4


def test_shim_runs_cli_main():
    spec = importlib.util.spec_from_file_location("inpaint_shim", ROOT / "inpaint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is inpaint.main


def _bad_inputs(tmp: Path) -> dict[str, tuple[list, str]]:
    """name -> (arguments after --checkpoint, a fragment the error must contain)."""
    (image,) = _images(tmp / "in", count=1)
    other = _images(tmp / "in2", count=2)
    wrong_size = _write(tmp / "small_mask.png", np.zeros((4, 4), dtype=np.uint8))
    rgb = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    rgb_mask = _write(tmp / "rgb_mask.png", rgb)
    grey = np.full((SIZE, SIZE), 128, dtype=np.uint8)
    grey[0] = 255
    grey_mask = _write(tmp / "grey_mask.png", grey)
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    preset = ["--mask_preset", "center"]
    return {
        "size mismatch": (["uncond", "--image", image, "--mask", wrong_size], "4x4"),
        "rgb mask": (["uncond", "--image", image, "--mask", rgb_mask], "not single-channel"),
        "grey mask": (["uncond", "--image", image, "--mask", grey_mask], "not binary"),
        "corrupt image": (["uncond", "--image", corrupt, *preset], "cannot read image"),
        "corrupt mask": (["uncond", "--image", image, "--mask", corrupt], "cannot read mask"),
        "empty folder": (["uncond", "--image", empty, *preset], "holds no PNG or JPEG"),
        "missing image": (["uncond", "--image", tmp / "nope.png", *preset], "does not exist"),
        "mask count": (["uncond", "--image", image, *other, "--mask", *other], "2 masks for 3"),
        "label unconditional": (
            ["uncond", "--image", image, *preset, "--class_label", 1],
            "unconditional",
        ),
        "label range": (
            ["cond", "--image", image, *preset, "--class_label", 10],
            "outside [0, 10)",
        ),
        "guidance no label": (
            ["cond", "--image", image, *preset, "--guidance_scale", 3],
            "needs --class_label",
        ),
        "bad checkpoint": ([tmp / "in", "--image", image, *preset], "no exported pipeline"),
    }


BAD_INPUTS = (
    "size mismatch",
    "rgb mask",
    "grey mask",
    "corrupt image",
    "corrupt mask",
    "empty folder",
    "missing image",
    "mask count",
    "label unconditional",
    "label range",
    "guidance no label",
    "bad checkpoint",
)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input(case, tmp_path, checkpoints, capsys):
    args, fragment = _bad_inputs(tmp_path)[case]
    checkpoint = checkpoints.get(args[0], args[0]) if isinstance(args[0], str) else args[0]
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "--checkpoint", checkpoint, *args[1:], "--output", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    if case in ("size mismatch", "rgb mask", "grey mask", "corrupt image", "corrupt mask"):
        assert str(tmp_path) in lines[0]  # names the file
    assert not out.exists() and not list(tmp_path.glob(".tmp-*")) and stdout == ""


def test_cli_refuses_foreign_output_folder(tmp_path, checkpoints, capsys):
    (image,) = _images(tmp_path / "in", count=1)
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("keep me")
    code, _, err = _run(
        capsys,
        "--checkpoint",
        checkpoints["uncond"],
        "--image",
        image,
        "--mask_preset",
        "center",
        "--output",
        folder,
    )
    assert code == 2 and "is a folder cdrl did not write" in err
    assert (folder / "thesis.txt").read_text() == "keep me"


def test_read_mask_accepts_jpeg_edges_and_grey_palette(tmp_path):
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255
    jpeg = _write(tmp_path / "mask.jpg", mask)
    read = inpaint.read_mask(jpeg)
    assert (read == (mask > 127)).mean() > 0.95
    palette = Image.fromarray(mask).convert("P")
    palette.save(tmp_path / "palette.png")
    assert (inpaint.read_mask(tmp_path / "palette.png") == (mask > 127)).all()


# ---------------------------------------------------------------- experiments/inpaint_digits.py


def test_inpaint_digits_measurements():
    script = load_experiment("inpaint_digits")
    images = torch.rand(6, 1, SIZE, SIZE) * 2 - 1
    repaint = torch.from_numpy(preset_mask("left_half", SIZE)).reshape(1, 1, SIZE, SIZE)
    mean = torch.zeros(1, SIZE, SIZE)
    filled = script.fill_with_mean(images, repaint, mean)
    # bit-exact: the known half is copied, not computed
    assert (filled[..., :4] == 0).all() and torch.equal(filled[..., 4:], images[..., 4:])
    assert script.known_pixel_error(filled, images, repaint) == 0.0
    changed = filled.clone()
    changed[0, 0, 0, 7] += 0.5
    assert script.known_pixel_error(changed, images, repaint) == pytest.approx(0.5)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    right = torch.nn.functional.one_hot(labels, 10).float()
    wrong = torch.nn.functional.one_hot((labels + 1) % 10, 10).float()
    assert script.class_match_rate(right, labels) == 1.0
    assert script.class_match_rate(wrong, labels) == 0.0
    good = script.summarize_half("left_half", right.repeat_interleave(2, 0), wrong, labels, 0.0)
    assert good["passes"] and good["model_class_rate"] == 1.0 and good["improvement"] == 1.0
    assert not script.summarize_half("left_half", wrong, right, labels, 0.0)["passes"]
    assert not script.summarize_half("left_half", right, wrong, labels, 0.1)["passes"]
    assert good["paired_z"] == float("inf")
    # Better by one image in six: higher, but not clearly (paired z about 1), so it fails.
    slightly = right.clone()
    slightly[1:] = wrong[1:]
    baseline = wrong.clone()
    close = script.summarize_half("left_half", slightly, baseline, labels, 0.0)
    assert close["improvement"] > 0 and 0.5 < close["paired_z"] < 1.5 and not close["passes"]
    # 120 images, the model right on 80 and the mean fill on 40 (disjoint but overlapping by 20):
    labels = torch.arange(120) % 10
    right = torch.nn.functional.one_hot(labels, 10).float()
    wrong = torch.nn.functional.one_hot((labels + 1) % 10, 10).float()
    model = torch.cat([right[:80], wrong[80:]])
    fill = torch.cat([wrong[:60], right[60:100], wrong[100:]])
    clear = script.summarize_half("left_half", model, fill, labels, 0.0)
    assert clear["paired_z"] > 2 and clear["passes"]
    json.dumps(good)


def test_inpaint_digits_main(tmp_path, checkpoints, monkeypatch):
    script = load_experiment("inpaint_digits")
    from cdrl.evaluation.digits import DigitsClassifier

    torch.manual_seed(0)
    monkeypatch.setattr(script, "load_digits_classifier", lambda path: DigitsClassifier().eval())
    out = tmp_path / "results"
    code = script.main(
        ["--checkpoint", str(checkpoints["uncond"]), "--num_images", "6", "--output_dir", str(out)]
    )
    result = json.loads((out / "inpaint_digits.json").read_text())
    assert code == (0 if result["passes"] else 1)
    assert [row["mask"] for row in result["halves"]] == list(script.HALVES)
    assert all(
        row["known_preserved"] and row["known_max_abs_error"] == 0 for row in result["halves"]
    )
    assert "| left_half |" in (out / "inpaint_digits.md").read_text()
    with Image.open(out / "inpaint_digits.png") as figure:  # 12 rows of 6 digits, upscaled 6x
        assert figure.size == ((6 * 9 + 1) * 6, (12 * 9 + 1) * 6)
