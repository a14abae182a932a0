"""Tests of cdrl.evaluation.fidelity: the digits extractor registered with torch-fidelity, references, metrics.

torch-fidelity runs here on tiny in-memory sets with a quickly trained digits classifier (4 epochs,
about 86% test accuracy: enough for the mechanics, not for quality figures).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from conftest import assert_close_float32
from experiment_scripts import load_experiment
from PIL import Image
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

import cdrl.evaluation.digits as dc
from cdrl.data import DataError
from cdrl.evaluation.digits import digits_accuracy, digits_classifier_path, digits_split
from cdrl.evaluation.fidelity import (
    DIGITS_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    DigitsFeatureExtractor,
    Reference,
    UInt8Images,
    check_extractor,
    compute_fidelity,
    extractor_fingerprint,
    load_reference,
)
from cdrl.images import to_uint8, to_uint8_images

ROOT = Path(__file__).resolve().parents[1]
DIGITS = (1, 8, 8)


@pytest.fixture(scope="module")
def split():
    x_train, y_train, x_test, y_test = digits_split()
    return to_uint8(x_train), y_train, to_uint8(x_test), y_test


def _metrics(input1, input2=None, weights=None, **kwargs) -> dict[str, float]:
    """torch-fidelity's own entry point with the registered digits extractor, no cache."""
    return torch_fidelity.calculate_metrics(
        input1=input1,
        input2=input2,
        feature_extractor=DIGITS_EXTRACTOR,
        feature_extractor_weights_path=str(weights),
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
        **kwargs,
    )


# ------------------------------------------------------------------ the extractor


def test_extractor_and_data_sets_are_registered():
    assert FEATURE_EXTRACTORS_REGISTRY[DIGITS_EXTRACTOR] is DigitsFeatureExtractor
    assert DigitsFeatureExtractor.get_provided_features_list() == ("features", "logits")
    layers = {
        m: DigitsFeatureExtractor.get_default_feature_layer_for_metric(m)
        for m in ("fid", "kid", "isc")
    }
    assert layers == {"fid": "features", "kid": "features", "isc": "logits"}
    assert {"digits-train", "digits-test", "cifar10-train"} <= set(DATASETS_REGISTRY)


def test_extractor_outputs_match_the_classifier(classifier, weights, split):
    x = split[2][:16]
    extractor = DigitsFeatureExtractor(DIGITS_EXTRACTOR, ["logits", "features"], str(weights))
    assert not extractor.training
    logits, features = extractor(x)  # in the requested order
    with torch.no_grad():
        expected_features, expected_logits = classifier.features_and_logits(x.float() / 127.5 - 1)
        torch.testing.assert_close(expected_logits, classifier(x.float() / 127.5 - 1))
        torch.testing.assert_close(expected_features, classifier.features(x.float() / 127.5 - 1))
    # the extractor loaded the weights again: its kernels may round differently (float32)
    assert_close_float32(features, expected_features)
    assert_close_float32(logits, expected_logits)
    # RGB copies of grey digits give the same features; other sizes and dtypes are refused.
    (rgb,) = DigitsFeatureExtractor(DIGITS_EXTRACTOR, ["features"], str(weights))(
        x.expand(-1, 3, -1, -1)
    )
    assert_close_float32(rgb, features)
    with pytest.raises(ValueError, match="8x8"):
        extractor(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        extractor(x.float())


def test_extractor_trains_the_classifier_on_first_use(classifier, tmp_path, monkeypatch):
    calls = []

    def fake_train(**kwargs):
        calls.append(kwargs)
        return classifier

    monkeypatch.setattr(dc, "train_digits_classifier", fake_train)
    monkeypatch.setenv("CDRL_CACHE_DIR", str(tmp_path))
    DigitsFeatureExtractor(DIGITS_EXTRACTOR, ["features"])  # default path: $CDRL_CACHE_DIR/...
    assert len(calls) == 1 and (tmp_path / "digits_classifier" / "config.json").is_file()
    assert digits_classifier_path() == tmp_path / "digits_classifier"  # now found: no training
    assert digits_classifier_path(tmp_path / "other") == tmp_path / "other"
    assert len(calls) == 2 and (tmp_path / "other" / "config.json").is_file()


def test_uint8_view_rounds_like_the_png_writer_and_repeats_grey():
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    expected = torch.from_numpy(to_uint8_images(x)[0]).permute(2, 0, 1)
    view = UInt8Images([(x[0], torch.tensor([3]))])  # a project data set's (x, cond) items
    # bit-exact: the same float32 input through the same rounding, in one process
    assert view[0].dtype == torch.uint8 and torch.equal(view[0], expected)
    # and the levels known independently: pixel k is k * 255 / 63, at least 1/42 from a .5 boundary
    assert view[0].flatten().tolist() == [round(k * 255 / 63) for k in range(64)]
    rgb = UInt8Images(expected[None], channels=3)[0]
    assert rgb.shape == (3, 8, 8) and all(torch.equal(c, expected[0]) for c in rgb)
    assert torch.equal(
        to_uint8(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)).flatten(),
        torch.tensor([0, 128, 255], dtype=torch.uint8),
    )


# ------------------------------------------------------------------ metrics through torch-fidelity


def test_fid_of_a_set_against_itself_is_about_zero(weights, split):
    test = UInt8Images(split[2][:120])
    figures = _metrics(test, test, weights, fid=True)
    assert abs(figures[torch_fidelity.KEY_METRIC_FID]) < 1e-3


def test_fid_and_kid_order_real_halves_below_noise(weights, split):
    generator = torch.Generator().manual_seed(0)
    test = split[2]
    noise = torch.randint(0, 256, (180, *DIGITS), generator=generator, dtype=torch.uint8)
    real = _metrics(
        UInt8Images(test[:180]),
        UInt8Images(test[180:]),
        weights,
        fid=True,
        kid=True,
        kid_subset_size=100,
    )
    fake = _metrics(
        UInt8Images(noise),
        UInt8Images(test[180:]),
        weights,
        fid=True,
        kid=True,
        kid_subset_size=100,
    )
    assert 0 < real[torch_fidelity.KEY_METRIC_FID] < fake[torch_fidelity.KEY_METRIC_FID] / 5
    assert real[torch_fidelity.KEY_METRIC_KID_MEAN] < fake[torch_fidelity.KEY_METRIC_KID_MEAN] / 5


def test_inception_score_counts_classes(weights, split):
    _, _, test, labels = split
    mixed = _metrics(UInt8Images(test), weights=weights, isc=True, isc_splits=2)
    ones = _metrics(UInt8Images(test[labels == 1]), weights=weights, isc=True, isc_splits=2)
    assert mixed[torch_fidelity.KEY_METRIC_ISC_MEAN] > 4  # at most 10 classes
    assert ones[torch_fidelity.KEY_METRIC_ISC_MEAN] < 1.5  # one class: about 1


def test_registered_digits_sets_work_by_name(weights):
    figures = _metrics("digits-test", "digits-test", weights, fid=True)
    assert abs(figures[torch_fidelity.KEY_METRIC_FID]) < 1e-3


def test_compute_fidelity_names_figures_and_caches_the_reference(weights, split, tmp_path):
    train, test = split[0], split[2]
    reference = Reference.from_images("test", test)
    cache = tmp_path / "cache"
    kwargs = dict(extractor=DIGITS_EXTRACTOR, weights_path=weights, cache_root=cache)
    figures, settings = compute_fidelity(
        train[:50], reference, metrics={"fid", "kid", "isc"}, **kwargs
    )
    assert set(figures) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in figures.values())
    assert settings["kid_subset_size"] == 50 and settings["isc_splits"] == 10
    assert settings["feature_layers"] == {"fid": "features", "isc": "logits", "kid": "features"}
    name = settings["reference_cache_name"]
    cached = sorted(p.name for p in cache.iterdir())
    assert cached and all(p.startswith(name) for p in cached)
    again, _ = compute_fidelity(train[:50], reference, metrics={"fid", "kid", "isc"}, **kwargs)
    assert again == figures  # from the cached reference features and statistics
    assert compute_fidelity(test, reference, metrics={"fid"}, **kwargs)[0]["fid"] == pytest.approx(
        0, abs=1e-3
    )
    with pytest.raises(ValueError, match="reference"):
        compute_fidelity(train[:50], None, metrics={"kid"}, **kwargs)
    with pytest.raises(ValueError, match="subset"):
        compute_fidelity(train[:50], reference, metrics={"precision"}, **kwargs)


def test_cache_names_follow_data_and_extractor_weights(weights, tmp_path):
    images = torch.zeros(4, *DIGITS, dtype=torch.uint8)
    base = Reference.from_images("ref", images)
    other = Reference.from_images("ref", images + 1)
    fingerprint = extractor_fingerprint(DIGITS_EXTRACTOR, weights)
    assert base.cache_name(fingerprint) == Reference.from_images("ref", images.clone()).cache_name(
        fingerprint
    )
    assert base.cache_name(fingerprint) != other.cache_name(fingerprint)
    copy = tmp_path / "copy"
    shutil.copytree(weights, copy)
    assert extractor_fingerprint(DIGITS_EXTRACTOR, copy) == fingerprint  # the content counts
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert extractor_fingerprint(DIGITS_EXTRACTOR, copy) != fingerprint
    assert "/" not in base.cache_name(fingerprint) and base.cache_name(fingerprint).startswith(
        "cdrl-ref-"
    )


def test_digits_accuracy_reads_the_requested_class(classifier, split):
    _, _, test, labels = split
    right = digits_accuracy(test, labels, classifier)
    wrong = digits_accuracy(test, (labels + 1) % 10, classifier)
    assert right["accuracy"] > 0.8 > 0.2 > wrong["accuracy"]
    assert sorted(right["per_class"]) == list(range(10))
    json.dumps(right)


def test_check_extractor_reports_unusable_inception_weights(tmp_path):
    bogus = tmp_path / "weights.pth"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=f"could not be loaded from {bogus}"):
        check_extractor(INCEPTION_EXTRACTOR, bogus)


# ------------------------------------------------------------------ references


def _write_pngs(folder: Path, n: int, size: int, mode: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for k in range(n):
        channels = 3 if mode == "RGB" else 1
        array = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        Image.fromarray(array if channels == 3 else array[..., 0], mode).save(folder / f"{k}.png")


def test_registered_and_config_references(split):
    test = load_reference("digits-test", sample_shape=DIGITS)
    assert test.kind == "registered" and len(test) == 360 and test.sample_shape == DIGITS
    assert test.images()[0].dtype == torch.uint8
    data = test.data([0, 1])
    assert data.shape == (2, *DIGITS) and data.min() >= -1 and data.max() <= 1
    config = load_reference(f"{ROOT / 'configs/digits.yaml'}:test", sample_shape=DIGITS)
    assert config.kind == "config" and len(config) == 360
    # the config's data are the same digits, in data units (not rounded to uint8)
    torch.testing.assert_close(
        config.data().sort(dim=0).values, torch.sort(digits_split()[2], dim=0).values
    )
    # bit-exact: both are sklearn's integer pixels scaled by the same float32 formula (no reduction)
    assert torch.equal(test.data(), config.data())  # registered project sets keep exact values too
    train = load_reference(str(ROOT / "configs/digits.yaml"), sample_shape=DIGITS)
    assert len(train) == 1437 and train.identity != config.identity
    assert test.describe() == {
        "spec": "digits-test",
        "kind": "registered",
        "size": 360,
        "shape": [1, 8, 8],
        "num_bins": 17,
    }
    assert (
        train.num_bins == 17
        and load_reference(str(ROOT / "configs/toy2d.yaml"), sample_shape=(2,)).num_bins is None
    )


def test_folder_reference_takes_the_model_shape_and_tracks_its_files(tmp_path):
    folder = tmp_path / "rgb16"
    _write_pngs(folder, 3, 16, "RGB")
    reference = load_reference(str(folder), sample_shape=DIGITS)
    assert reference.kind == "folder" and len(reference) == 3
    assert reference.sample_shape == DIGITS and reference.images()[2].shape == DIGITS
    identity = reference.identity
    _write_pngs(tmp_path / "more", 1, 16, "RGB", seed=1)
    shutil.move(tmp_path / "more" / "0.png", folder / "9.png")
    assert load_reference(str(folder), sample_shape=DIGITS).identity != identity


@pytest.mark.parametrize(
    "spec, shape, match",
    [
        ("no-such-set", DIGITS, "unknown reference 'no-such-set'.*digits-test"),
        ("digits-test", (3, 32, 32), "1x8x8 .* but the model makes 3x32x32"),
        ("missing.yaml", DIGITS, "reference config missing.yaml does not exist"),
        ("/no/such/folder", DIGITS, "neither a folder of images nor a config file"),
        ("{empty}", DIGITS, "no images"),
        ("{folder}", (2,), "makes vectors"),
    ],
)
def test_bad_references(spec, shape, match, tmp_path):
    (tmp_path / "empty").mkdir()
    _write_pngs(tmp_path / "folder", 1, 8, "L")
    spec = spec.format(empty=tmp_path / "empty", folder=tmp_path / "folder")
    with pytest.raises(DataError, match=match):
        load_reference(spec, sample_shape=shape)


def test_cifar10_reference_without_a_local_copy_is_a_clear_error(tmp_path):
    with pytest.raises(
        DataError, match=f"reference 'cifar10-train' could not be loaded.*{tmp_path}"
    ):
        load_reference("cifar10-train", sample_shape=(3, 32, 32), data_dir=tmp_path)


# ------------------------------------------------------------------ the floor experiment


def test_floor_experiment_halves_and_rows(weights, monkeypatch):
    floor = load_experiment("digits_metrics_floor")
    a, b = floor.halves(torch.arange(7), seed=0)
    assert len(a) == 3 and len(b) == 4 and sorted(torch.cat([a, b]).tolist()) == list(range(7))
    monkeypatch.setattr(floor, "measure", lambda a, b, w: {"fid": float(len(a)), "kid_mean": 0.0})
    rows = floor.floor(weights, repeats=2)
    assert [(r["pair"], r["n1"], r["n2"], r["repeats"]) for r in rows] == [
        ("test half vs test half", 180, 180, 2),
        ("train half vs train half", 718, 719, 2),
        ("test vs train", 360, 1437, 1),
    ]
    assert rows[0]["fid"] == 180.0 and rows[0]["fid_spread"] == 0.0


def test_a_pickle_planted_in_the_cache_never_runs(weights, split, tmp_path):
    """Class F: torch-fidelity reads ``<name>.pt`` cache files with torch.load(weights_only=False); cdrl's
    cache is safetensors only, so a planted pickle under any name torch-fidelity would read is ignored."""
    train, test = split[0], split[2]
    reference = Reference.from_images("test", test)
    cache = tmp_path / "cache"
    cache.mkdir()
    marker = tmp_path / "executed"
    name = reference.cache_name(extractor_fingerprint(DIGITS_EXTRACTOR, weights))
    for suffix in ("-features-features", "-features-logits", "-stat-fid-features"):
        torch.save(_Payload(marker), cache / f"{name}-{DIGITS_EXTRACTOR}{suffix}.pt")
    kwargs = dict(extractor=DIGITS_EXTRACTOR, weights_path=weights, cache_root=cache)
    for _ in range(2):  # the second run reads the cache cdrl wrote
        try:
            figures, _ = compute_fidelity(train[:50], reference, metrics={"fid", "kid"}, **kwargs)
        finally:
            assert not marker.exists(), "a pickle in the cache folder was unpickled"
    assert all(np.isfinite(v) for v in figures.values())
    assert any(p.suffix == ".safetensors" for p in cache.iterdir())
    for path in cache.glob("*.safetensors"):
        path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        compute_fidelity(train[:50], reference, metrics={"fid"}, **kwargs)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
