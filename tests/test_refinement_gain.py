"""experiments/refinement_gain.py: the same model sampled with and without Langevin refinement."""

from __future__ import annotations

import json

import pytest
import torch
from experiment_scripts import load_experiment


def test_per_level_sampler_with_one_k_is_the_pipeline(tiny_pipeline, randomize_output):
    randomize_output(tiny_pipeline.initializer)
    module = load_experiment("refinement_gain")
    levels = tiny_pipeline.scheduler.schedule.num_levels
    for k in (0, 2):
        ours = module.sample_per_level(tiny_pipeline, [k] * levels, 5, seed=3, batch_size=5)
        out = tiny_pipeline(
            batch_size=5,
            num_langevin_steps=k,
            generator=torch.Generator().manual_seed(3),
            output_type="pt",
        ).images
        torch.testing.assert_close(ours, torch.as_tensor(out) * 2 - 1, rtol=0, atol=1e-6)


def test_k_at_any_one_level_changes_the_samples(tiny_pipeline, randomize_output):
    randomize_output(tiny_pipeline.initializer)
    module = load_experiment("refinement_gain")
    levels = tiny_pipeline.scheduler.schedule.num_levels

    def draw(ks):
        return module.sample_per_level(tiny_pipeline, ks, 4, seed=0, batch_size=4)

    base = draw([0] * levels)
    assert torch.equal(base, draw([0] * levels))
    for t in (0, levels - 1):
        assert not torch.equal(base, draw([2 if s == t else 0 for s in range(levels)]))


def test_main_writes_every_row(tiny_pipeline, tmp_path, digits_classifier_path):
    module = load_experiment("refinement_gain")
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "gain.json"
    argv = ["--pipeline", str(tmp_path / "pipe"), "--num_samples", "12", "--k", "1"]
    argv += [
        "--probe_images",
        "4",
        "--classifier",
        str(digits_classifier_path),
        "--refine_tops",
        "2",
    ]
    assert module.main([*argv, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    levels = tiny_pipeline.scheduler.schedule.num_levels
    assert set(result["end_to_end"]) == {"K0", "stored", "K1"}  # the tiny pipeline stores K = 3
    assert result["end_to_end"]["K0"]["ks"] == [0] * levels
    assert result["end_to_end"]["stored"]["ks"] == [3] * levels
    assert len(result["only_level"]) == levels
    assert result["only_level"]["2"]["ks"] == [1 if t == 2 else 0 for t in range(levels)]
    assert set(result["probe"]) == {"K0", "K1"}
    assert result["top_levels"]["2"]["ks"] == [0] * (levels - 2) + [1, 1]
    ratio = result["end_to_end"]["K0"]["fid"] / result["end_to_end"]["stored"]["fid"]
    assert abs(result["fid_ratio_K0_over_stored"] - ratio) < 1e-9


def test_scheduler_settings_change_the_sampler(tiny_pipeline, tmp_path, digits_classifier_path):
    module = load_experiment("refinement_gain")
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    argv = ["--pipeline", str(tmp_path / "pipe"), "--num_samples", "12", "--no_per_level"]
    argv += ["--classifier", str(digits_classifier_path)]
    results = {}
    for extra in ([], ["--scheduler", "tweedie=false"]):
        out = tmp_path / f"gain{len(extra)}.json"
        assert module.main([*argv, *extra, "--output", str(out)]) == 0
        results[len(extra)] = json.loads(out.read_text())["end_to_end"]["K0"]["fid"]
    assert results[0] != results[2]
    with pytest.raises(SystemExit):
        module.main([*argv, "--scheduler", "no_such_key=1"])
