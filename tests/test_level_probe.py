"""experiments/level_probe.py: the start-from-real-data probe of each recovery level."""

from __future__ import annotations

import math

import torch
from experiment_scripts import load_experiment

from cdrl.evaluation.digits import DigitsClassifier, digits_split


def test_probe_rows_cover_every_start_level(tiny_pipeline):
    probe = load_experiment("level_probe").probe
    torch.manual_seed(0)
    classifier = DigitsClassifier().eval()
    _, _, x_test, y_test = digits_split()
    settings = tiny_pipeline.scheduler.langevin_settings(n_steps=1)
    rows = probe(tiny_pipeline, x_test[:8], y_test[:8], classifier, settings=settings)
    levels = tiny_pipeline.scheduler.schedule.num_levels
    assert [row["start_level"] for row in rows] == list(range(levels, 0, -1))
    assert math.isnan(rows[0]["same_class"])
    for row in rows:
        assert 0.0 <= row["confident"] <= 1.0
        assert row["start_level"] == levels or 0.0 <= row["same_class"] <= 1.0


def test_probe_from_real_x1_keeps_the_digit_with_a_perfect_denoiser(tiny_pipeline, monkeypatch):
    """If every recovery step returned the clean digit, the class would survive from any start."""
    module = load_experiment("level_probe")
    _, _, x_test, y_test = digits_split()
    x0 = x_test[:6]
    monkeypatch.setattr(module, "reverse_step", lambda *a, **k: x0.clone())
    monkeypatch.setattr(module, "tweedie_denoise", lambda ebm, schedule, x, settings: x)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(
                torch.zeros(1)
            )  # judge_digits reads the device from it

        def forward(self, images):
            return self.probabilities(images).log()

        def probabilities(self, images):
            match = (images[:, None] - x0[None]).flatten(2).abs().sum(-1).argmin(1)
            return torch.nn.functional.one_hot(y_test[:6][match], 10).float()

    rows = module.probe(tiny_pipeline, x0, y_test[:6], Oracle())
    assert all(row["same_class"] == 1.0 for row in rows[1:])
    assert all(row["confident"] == 1.0 for row in rows)
