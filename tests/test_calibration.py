"""cdrl.calibration: the implicit classifier's offsets (fit, storage, train.py export, cdrl-calibrate) and
composition with negation="posterior", which needs them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import train_debug

from cdrl.calibration import fit_condition_offsets
from cdrl.cli.calibrate import main as calibrate_main
from cdrl.config import LangevinConfig
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.sampling import level
from cdrl.schedule import make_schedule

SIZES = (3, 2)
DELTAS = (torch.tensor([0.0, 5.0, -2.0]), torch.tensor([0.0, 1.0]))


class ConstantEnergy(torch.nn.Module):
    """E(y, c) = sum over the set conditions k of DELTAS[k][c_k]: the energy ignores y, so the implicit
    classifier is softmax(-delta / temperature + b) for every y, and the fitted b has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, y, noise_level, cond):
        out = torch.zeros(y.shape[0])
        for k, deltas in enumerate(DELTAS):
            is_set = cond[:, k] < SIZES[k]
            out = out + torch.where(is_set, deltas[cond[:, k].clamp(max=SIZES[k] - 1)], 0.0)
        return out


def _labels() -> torch.Tensor:
    first = torch.tensor([0] * 10 + [1] * 30 + [2] * 60)
    second = torch.tensor([0] * 40 + [1] * 60)[
        torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ]
    return torch.stack([first, second], 1)


def test_offsets_are_the_maximum_likelihood_solution():
    """With a y-independent energy the likelihood is maximal where the classifier gives the label
    frequencies: b_v / temperature_t = log(n_v / n_0) + (delta_v - delta_0) / temperature_t (b in energy
    units)."""
    schedule, settings = make_schedule("cdrl", num_levels=3), LangevinConfig()
    cond = _labels()
    offsets = fit_condition_offsets(
        ConstantEnergy(),
        schedule,
        settings,
        torch.randn(100, 2),
        cond,
        SIZES,
        generator=torch.Generator().manual_seed(0),
        batch_size=32,
    )
    assert [tuple(o.shape) for o in offsets] == [(3, 3), (3, 2)]
    for t in range(3):
        temperature = float(level(schedule, torch.tensor([t]), settings).temperature[0])
        for k, deltas in enumerate(DELTAS):
            counts = torch.bincount(cond[:, k], minlength=SIZES[k]).double()
            expected = temperature * torch.log(counts / counts[0]) + (deltas - deltas[0]).double()
            assert offsets[k][t, 0] == 0
            rel = (offsets[k][t].double() - expected).abs().max() / expected.abs().max()
            assert rel < 1e-4, (t, k, offsets[k][t], expected)


class Shifted(torch.nn.Module):
    """An EBM with +``shift`` added to class 0's energy: the shift the training loss cannot see."""

    def __init__(self, inner: torch.nn.Module, shift: float) -> None:
        super().__init__()
        self.inner, self.shift = inner, shift

    def forward(self, y, noise_level, cond):
        return self.inner(y, noise_level, cond) + self.shift * (cond[:, 0] == 0).float()


def test_offsets_undo_a_per_condition_energy_shift(mlp_cond_ebm, randomize_output):
    """Shifting one class's energy by a constant moves its fitted offset (an energy) by exactly that
    constant, so the calibrated classifier is unchanged (the offsets are the MLE, which is equivariant)."""
    randomize_output(mlp_cond_ebm)
    schedule, settings = make_schedule("cdrl", num_levels=3), LangevinConfig()
    x0, cond = (
        torch.randn(200, 2),
        torch.randint(0, 3, (200, 1), generator=torch.Generator().manual_seed(1)),
    )

    def fit(ebm):
        return fit_condition_offsets(
            ebm, schedule, settings, x0, cond, (3,), generator=torch.Generator().manual_seed(0)
        )[0]

    plain, shifted = fit(mlp_cond_ebm), fit(Shifted(mlp_cond_ebm, 0.05))
    moved = (shifted[:, 1:] - plain[:, 1:]).double()
    torch.testing.assert_close(moved, torch.full_like(moved, -0.05), rtol=0, atol=2e-4)


def test_fit_checks_its_inputs():
    schedule, settings = make_schedule("cdrl", num_levels=2), LangevinConfig()
    with pytest.raises(ValueError, match=r"cond must be \(n, 2\) labels"):
        fit_condition_offsets(
            ConstantEnergy(),
            schedule,
            settings,
            torch.randn(4, 2),
            torch.zeros(4, dtype=torch.long),
            SIZES,
        )
    with pytest.raises(ValueError, match="got 4 examples and 3 labels"):
        fit_condition_offsets(
            ConstantEnergy(),
            schedule,
            settings,
            torch.randn(4, 2),
            torch.zeros(3, 2, dtype=torch.long),
            SIZES,
        )


def _pipeline(mlp_cond_ebm) -> CDRLPipeline:
    pipe = CDRLPipeline(
        ebm=mlp_cond_ebm, initializer=None, scheduler=CDRLScheduler(num_levels=2, n_steps=2)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_stores_offsets_and_posterior_negation_needs_them(mlp_cond_ebm, tmp_path):
    pipe = _pipeline(mlp_cond_ebm)
    compose = [((1,), -2.0)]
    with pytest.raises(ValueError, match="cdrl-calibrate"):
        pipe(batch_size=4, compose=compose, negation="posterior", output_type="pt")
    pipe(batch_size=4, compose=compose, output_type="pt")  # linear negation needs no offsets
    x0, cond = torch.randn(40, 2), torch.randint(0, 10, (40, 1))
    offsets = pipe.calibrate(x0, cond, generator=torch.Generator().manual_seed(0))
    assert pipe.scheduler.config.condition_offsets == [offsets[0].tolist()]
    pipe.save_pretrained(tmp_path / "p")
    stored = json.loads((tmp_path / "p/scheduler/scheduler_config.json").read_text())
    assert stored["condition_offsets"] == [offsets[0].tolist()]
    loaded = CDRLPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    out = loaded(
        batch_size=4,
        compose=compose,
        negation="posterior",
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (4, 2) and torch.isfinite(out).all()


def test_posterior_negation_uses_the_offsets(mlp_cond_ebm):
    """The offsets move the implicit classifier, so they change the composed energy's samples."""
    pipe = _pipeline(mlp_cond_ebm)
    kwargs = dict(
        batch_size=8, compose=[((0,), 1.0), ((1,), -3.0)], negation="posterior", output_type="pt"
    )

    def run(offset: float) -> torch.Tensor:
        rows = [[0.0, offset] + [0.0] * (pipe.condition_sizes[0] - 2)] * 2
        pipe.scheduler.register_to_config(condition_offsets=[rows])
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images

    assert torch.equal(run(0.0), run(0.0))  # bit-exact: same seed, batch and process
    assert not torch.allclose(run(0.0), run(30.0))
    pipe.scheduler.register_to_config(
        condition_offsets=[[[0.0, 1.0]] * 2]
    )  # 2 values, the model has 10
    with pytest.raises(ValueError, match=r"condition_offsets.*\(2, 10\).*cdrl-calibrate"):
        pipe(**kwargs)


def test_train_exports_offsets_for_conditional_models(tmp_path):
    out = tmp_path / "run"
    assert train_debug(out, "--set", "data.class_conditional=true", "train.max_steps=2") == 0
    offsets = json.loads((out / "pipeline/scheduler/scheduler_config.json").read_text())[
        "condition_offsets"
    ]
    assert len(offsets) == 1 and len(offsets[0]) == 6 and len(offsets[0][0]) == 10
    assert all(row[0] == 0 and all(math.isfinite(v) for v in row) for row in offsets[0])
    uncond = tmp_path / "uncond"
    assert train_debug(uncond, "--set", "train.max_steps=2") == 0
    stored = json.loads((uncond / "pipeline/scheduler/scheduler_config.json").read_text())
    assert stored.get("condition_offsets") is None


def test_calibrate_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_debug(out, "--set", "data.class_conditional=true", "train.max_steps=2") == 0
    scheduler_json = out / "pipeline/scheduler/scheduler_config.json"
    stored = json.loads(scheduler_json.read_text())
    del stored["condition_offsets"]  # as exported before train.py calibrated
    scheduler_json.write_text(json.dumps(stored))
    assert calibrate_main(["--checkpoint", str(out), "--num_samples", "64"]) == 0
    assert "stored the calibrated condition offsets" in capsys.readouterr().out
    offsets = json.loads(scheduler_json.read_text())["condition_offsets"]
    assert len(offsets[0]) == 6 and len(offsets[0][0]) == 10
    assert not list(scheduler_json.parent.glob(".tmp-*"))
    # Bad input: one line, exit code 2, nothing written.
    uncond = tmp_path / "uncond"
    assert train_debug(uncond, "--set", "train.max_steps=2") == 0
    before = (uncond / "pipeline/scheduler/scheduler_config.json").read_text()
    capsys.readouterr()
    assert calibrate_main(["--checkpoint", str(uncond)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unconditional" in err and "\n" not in err
    assert (uncond / "pipeline/scheduler/scheduler_config.json").read_text() == before
    assert calibrate_main(["--checkpoint", str(out), "--num_samples", "0"]) == 2
    assert "--num_samples must be >= 1" in capsys.readouterr().err
    assert calibrate_main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
