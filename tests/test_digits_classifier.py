"""Tests of cdrl.evaluation.digits (training, saving, judging, novelty) and experiments/digits_quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close_float32
from experiment_scripts import load_experiment

import cdrl.evaluation.digits as dc
from cdrl.evaluation.digits import (
    DigitsClassifier,
    digits_split,
    evaluate_accuracy,
    judge_digits,
    load_digits_classifier,
    novelty,
    train_digits_classifier,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split():
    return digits_split()


def test_split_shapes_and_range(split):
    x_train, y_train, x_test, y_test = split
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert x_train.min() == -1 and x_train.max() == 1
    assert torch.bincount(y_test).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    x_again = digits_split()[0]
    assert torch.equal(x_train, x_again)  # bit-exact: the same integer pixels scaled the same way


def test_default_training_accuracy(classifier, split):
    _, _, x_test, y_test = split
    assert not classifier.training
    assert evaluate_accuracy(classifier, x_test, y_test) >= 0.97


def test_shapes(classifier, split):
    x = split[2][:5]
    assert classifier(x).shape == (5, 10)
    features = classifier.features(x)
    assert features.shape == (5, classifier.config.feature_dim) and (features >= 0).all()
    probs = classifier.probabilities(x)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))


def test_training_is_deterministic_and_leaves_global_state():
    rng_state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = train_digits_classifier(seed=3, epochs=1).state_dict()
    b = train_digits_classifier(seed=3, epochs=1).state_dict()
    c = train_digits_classifier(seed=4, epochs=0).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.get_num_threads() == threads
    assert a.keys() == b.keys()
    # bit-exact: the same seed, batches and process (the promise of train_digits_classifier)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_save_load_round_trip(classifier, split, tmp_path):
    x = split[2][:64]
    classifier.save_pretrained(tmp_path / "clf")
    assert (tmp_path / "clf" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DigitsClassifier.from_pretrained(tmp_path / "clf")
    assert not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in classifier.state_dict().items())
    with torch.no_grad():  # equal weights; a reloaded model's kernels may still round differently
        assert_close_float32(loaded(x), classifier(x))


def test_load_trains_saves_then_loads(classifier, split, tmp_path, monkeypatch):
    calls = []

    def fake_train(**kwargs):
        calls.append(kwargs)
        return classifier

    monkeypatch.setattr(dc, "train_digits_classifier", fake_train)
    path = tmp_path / "cache" / "clf"
    with pytest.raises(FileNotFoundError, match="python -m cdrl.evaluation.digits --output"):
        load_digits_classifier(path, train_if_missing=False)
    first = load_digits_classifier(path)
    assert len(calls) == 1 and (path / "config.json").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["clf"]  # no temp dir left behind
    second = load_digits_classifier(path, train_if_missing=False)
    assert len(calls) == 1
    x = split[2][:32]
    with torch.no_grad():  # reloaded: equal weights, outputs equal up to float32 rounding
        assert_close_float32(first(x), classifier(x))
        assert_close_float32(second(x), classifier(x))


def test_default_path_follows_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CDRL_CACHE_DIR", str(tmp_path))
    assert dc.default_classifier_path() == tmp_path / "digits_classifier"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "digits_classifier")):
        load_digits_classifier(train_if_missing=False)
    monkeypatch.delenv("CDRL_CACHE_DIR")
    assert dc.default_classifier_path() == Path("~/.cache/cdrl/digits_classifier").expanduser()


def test_judge_real_digits_pass(classifier, split):
    result = judge_digits(split[2], classifier)
    assert result["passes"]
    assert result["confident_fraction"] >= 0.9
    assert result["classes_present"] == 10
    assert len(result["class_histogram"]) == 10
    assert sum(result["class_histogram"]) == pytest.approx(1.0)
    json.dumps(result)


def test_judge_single_digit_fails_balance(classifier, split):
    x_test, y_test = split[2], split[3]
    sevens = x_test[y_test == 7]
    result = judge_digits(sevens.repeat(3, 1, 1, 1), classifier)
    assert not result["passes"]
    assert result["max_class_fraction"] > 0.2
    assert result["classes_present"] < 10


def test_judge_noise_fails_confidence(classifier):
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = judge_digits(noise, classifier)
    assert not result["passes"]
    assert result["confident_fraction"] < 0.85


def test_novelty(split):
    x_train, _, x_test, _ = split
    copies = novelty(x_train[:300], x_train)
    assert copies["copy_fraction"] == 1.0 and copies["nn_distance_median"] == 0.0
    assert copies["copy_threshold"] > 0
    fresh = novelty(x_test, x_train)
    assert fresh["copy_fraction"] <= 0.02
    assert fresh["nn_distance_median"] == pytest.approx(fresh["reference_nn_distance_median"])
    json.dumps(fresh)


def test_measure_passes_on_real_digits(classifier, split):
    quality = load_experiment("digits_quality")
    x_train, _, x_test, _ = split
    result = quality.measure(x_test, classifier, x_train)
    assert result["passes"]
    assert result["novelty"]["copy_fraction"] <= 0.05
    json.dumps(result)


def test_quality_cli_with_stubbed_sampler(classifier, split, tmp_path, monkeypatch, capsys):
    quality = load_experiment("digits_quality")
    classifier.save_pretrained(tmp_path / "clf")
    x_test = split[2]
    monkeypatch.setattr(quality, "generate", lambda *args, **kwargs: x_test[: args[1]])
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--num_samples", "300"]
    argv += ["--classifier", str(tmp_path / "clf"), "--output", str(tmp_path / "r.json")]
    argv += ["--grid", str(tmp_path / "grid.png")]
    assert quality.main(argv) == 0
    assert "PASS" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["passes"] is True
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (91 * 4, 91 * 4)

    monkeypatch.setattr(
        quality, "generate", lambda *args, **kwargs: x_test[:1].repeat(args[1], 1, 1, 1)
    )
    assert quality.main(argv) == 0  # a miss is reported (FAIL) but exits 0 without --check
    assert "FAIL" in capsys.readouterr().out
    assert quality.main([*argv, "--check"]) == 1


def test_prior_labels_follow_the_training_frequencies(split):
    quality = load_experiment("digits_quality")
    labels = quality.prior_labels(20_000, seed=0)
    expected = torch.bincount(split[1], minlength=10).float() / len(split[1])
    observed = torch.bincount(labels, minlength=10).float() / len(labels)
    assert (observed - expected).abs().max() < 0.01
    assert torch.equal(quality.prior_labels(50, seed=3), quality.prior_labels(50, seed=3))


def test_generate_conditions_a_conditional_model_on_prior_labels(tmp_path, monkeypatch):
    from conftest import build_ebm, build_initializer

    from cdrl import CDRLPipeline
    from cdrl.pipeline import CDRLScheduler

    quality = load_experiment("digits_quality")
    for sizes, name in (((10,), "cond"), ((), "uncond")):
        CDRLPipeline(
            build_ebm(condition_sizes=sizes),
            build_initializer(condition_sizes=sizes),
            CDRLScheduler(num_levels=2, n_steps=1),
        ).save_pretrained(tmp_path / name)
    seen = []
    original = CDRLPipeline.__call__

    def recording(self, *args, **kwargs):
        seen.append((kwargs.get("class_labels"), kwargs.get("guidance_scale", 1.0)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CDRLPipeline, "__call__", recording)
    images = quality.generate(tmp_path / "cond", 12, 0, 5, "cpu", guidance_scale=2.0)
    assert images.shape == (12, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    labels = torch.cat([torch.as_tensor(c) for c, _ in seen])
    assert torch.equal(labels, quality.prior_labels(12, 0)) and {g for _, g in seen} == {2.0}
    seen.clear()
    quality.generate(tmp_path / "cond", 4, 0, 4, "cpu", labels="null")
    assert seen == [(None, 1.0)]
    seen.clear()
    quality.generate(tmp_path / "uncond", 4, 0, 4, "cpu")
    assert seen == [(None, 1.0)]
    with pytest.raises(SystemExit, match="--guidance_scale needs a class-conditional model"):
        quality.generate(tmp_path / "uncond", 4, 0, 4, "cpu", guidance_scale=3.0)


def test_classifier_cli_saves_and_overwrites(tmp_path, capsys):
    out = tmp_path / "clf"
    dc.main(["--output", str(out), "--epochs", "0"])
    assert "test accuracy" in capsys.readouterr().out
    first = DigitsClassifier.from_pretrained(out).head.weight
    dc.main(["--output", str(out), "--epochs", "0", "--seed", "1"])
    second = DigitsClassifier.from_pretrained(out).head.weight
    assert not torch.equal(first, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]
