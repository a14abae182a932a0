"""experiments/compose_digits.py: the terms, the scoring (on real digits), and an end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from experiment_scripts import load_experiment

from cdrl.data import attribute_values
from cdrl.evaluation.digits import digits_split

compose_digits = load_experiment("compose_digits")


def test_terms():
    terms = compose_digits.compose_terms
    assert terms("class", 3, and_weight=2.0, not_weight=-1.0) == [((3, None), 1.0)]
    assert terms("thick", 3, and_weight=2.0, not_weight=-1.0) == [
        ((3, None), 2.0),
        ((None, 1), 2.0),
    ]
    assert terms("thin", 7, and_weight=3.0, not_weight=-1.0) == [((7, None), 3.0), ((None, 0), 3.0)]
    assert terms("not_thick", 0, and_weight=2.0, not_weight=-1.5) == [
        ((0, None), 2.0),
        ((None, 1), -1.5),
    ]
    with pytest.raises(ValueError, match="unknown experiment"):
        terms("or", 0, and_weight=2.0, not_weight=-1.0)


class RealDigits:
    """Stands in for a pipeline: answers each request with real training digits of the requested class
    and thickness (thin for NOT thick), or of the wrong class when ``wrong`` is set."""

    condition_sizes = (10, 2)

    def __init__(self, wrong: bool = False):
        self.x, self.y, _, _ = digits_split()
        self.thick = torch.from_numpy(attribute_values("digits", self.x, "thickness")).bool()
        self.wrong = wrong

    def __call__(self, batch_size, compose, generator, output_type, negation="linear"):
        label = compose[0][0][0]
        if self.wrong:
            label = (label + 1) % 10
        keep = self.y == label
        if len(compose) > 1:
            want_thick = compose[1][0][1] == 1 and compose[1][1] > 0
            keep &= self.thick if want_thick else ~self.thick
        images = self.x[keep][:batch_size]
        images = images.repeat(batch_size // len(images) + 1, 1, 1, 1)[:batch_size]

        class Out:
            pass

        out = Out()
        out.images = (images + 1) / 2
        return out


def test_scores_on_real_digits(digits_classifier):
    classifier = digits_classifier  # the default one, trained once per session in a temporary cache
    kwargs = {
        "per_class": 8,
        "and_weight": 2.0,
        "not_weight": -1.0,
        "seed": 0,
    }
    result, samples = compose_digits.run(RealDigits(), classifier, **kwargs)
    mean = result["mean"]
    assert mean["thick"]["class_rate"] > 0.95 and mean["thick"]["thick_rate"] == 1.0
    assert mean["thick"]["class_and_thick"] > 0.95 and mean["thick"]["class_and_thin"] == 0.0
    assert mean["thin"]["thick_rate"] == 0.0 and mean["thin"]["class_and_thin"] > 0.95
    assert mean["not_thick"]["thick_rate"] == 0.0
    assert samples["thick"].shape == (10, 8, 1, 8, 8)
    assert len(result["cells"]) == 40
    wrong, _ = compose_digits.run(RealDigits(wrong=True), classifier, **kwargs)
    assert (
        wrong["mean"]["thick"]["class_rate"] < 0.05 and wrong["mean"]["thick"]["thick_rate"] == 1.0
    )


def test_main_end_to_end(tmp_path, tiny_cond_ebm):
    from cdrl.models import EnergyResNet
    from cdrl.pipeline import CDRLPipeline, CDRLScheduler

    torch.manual_seed(0)
    ebm = EnergyResNet(
        in_channels=1,
        sample_size=8,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        condition_sizes=(10, 2),
    )
    folder = tmp_path / "pipeline"
    CDRLPipeline(ebm, None, CDRLScheduler(num_levels=2, n_steps=1)).save_pretrained(folder)
    out = tmp_path / "results"
    args = ["--checkpoint", str(folder), "--output_dir", str(out), "--per_class", "6"]
    assert compose_digits.main(args) == 0
    result = json.loads((out / "compose_digits.json").read_text())
    assert result["not_weight"] == -1.0 and set(result["mean"]) == set(compose_digits.EXPERIMENTS)
    for row in result["mean"].values():
        assert all(0.0 <= value <= 1.0 for value in row.values())
    assert (out / "compose_digits.png").stat().st_size > 0
    assert (out / "compose_digits.md").read_text().startswith("| experiment")
    # Posterior negation needs calibrated offsets; with them it runs and says so.
    with pytest.raises(SystemExit, match="cdrl-calibrate"):
        compose_digits.main([*args, "--negation", "posterior"])
    pipe = CDRLPipeline.from_pretrained(folder)
    pipe.calibrate(
        torch.rand(40, 1, 8, 8) * 2 - 1,
        torch.stack([torch.arange(40) % 10, torch.arange(40) % 2], 1),
    )
    pipe.save_pretrained(folder)
    assert compose_digits.main([*args, "--negation", "posterior"]) == 0
    result = json.loads((out / "compose_digits.json").read_text())
    assert result["negation"] == "posterior"
    assert "NOT thick -1 (posterior)" in (out / "compose_digits.md").read_text()
    # A model without the (class, thickness) conditions is refused.
    CDRLPipeline(tiny_cond_ebm, None, CDRLScheduler(num_levels=2)).save_pretrained(tmp_path / "c")
    with pytest.raises(SystemExit, match="not a digits model with conditions"):
        compose_digits.main(["--checkpoint", str(tmp_path / "c"), "--output_dir", str(out)])
