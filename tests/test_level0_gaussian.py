"""The Gaussian lowest level of the density bound (issue 17, experiments/results/density.md §5):
``negative_log_likelihood(..., level0="gaussian")``, ``fit_level0_variance``, ``bits_per_dim`` and
``cdrl-evaluate --bpd_level0``, on tiny 8x8 pipelines, against computations written out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import NUM_CLASSES, _randomize_output, build_ebm, build_initializer
from PIL import Image
from torch.distributions import Normal

from cdrl.cli import evaluate
from cdrl.config import DataConfig
from cdrl.data import dequantize, load_dataset
from cdrl.evaluation.bpd import bits_per_dim, fit_level0_variance
from cdrl.evaluation.likelihood import negative_log_likelihood
from cdrl.pipeline import CDRLPipeline, CDRLScheduler

VARIANCE = 0.01


def pipeline(condition_sizes: tuple[int, ...] = (), data_scale: float = 1.0) -> CDRLPipeline:
    # a non-trivial mean (the output layer is zero-initialized)
    initializer = _randomize_output(build_initializer(condition_sizes=condition_sizes))
    scheduler = CDRLScheduler(n_steps=3, data_scale=data_scale)
    pipe = CDRLPipeline(
        ebm=build_ebm(condition_sizes=condition_sizes), initializer=initializer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hand_level0_term(pipe, x0, eps1, variance, label=None):
    """-log N(x_0; m(x_1), v I) + log q(x_1 | x_0) with torch.distributions, x_0 = data_scale * x0 and
    x_1 = sqrt(alpha_1) x_0 + sigma_1 eps1; m = the initializer's output at level 1's noise input over
    sqrt(alpha_1); label: the class fed to a conditional initializer."""
    schedule = pipe.scheduler.schedule
    alpha1 = schedule.alphas[1].double()
    sigma1 = torch.sqrt(1 - alpha1)
    x = x0.double() * pipe.scheduler.config.data_scale
    x1 = alpha1.sqrt() * x + sigma1 * eps1.double()
    b = x.shape[0]
    cond = None if label is None else torch.full((b, 1), label, dtype=torch.long)
    noise = schedule.noise_levels[1].expand(b)
    with torch.no_grad():
        mean = pipe.initializer(x1.float(), noise, cond).double() / alpha1.sqrt()
    log_decoder = Normal(mean, math.sqrt(variance)).log_prob(x).flatten(1).sum(1)
    log_forward = Normal(alpha1.sqrt() * x, sigma1).log_prob(x1).flatten(1).sum(1)
    return -log_decoder + log_forward


@pytest.mark.parametrize("data_scale", [1.0, 2.0])
def test_gaussian_level0_term_is_the_hand_computation(data_scale):
    pipe = pipeline(data_scale=data_scale)
    schedule, settings = pipe.scheduler.schedule, pipe.scheduler.langevin_settings()
    x0 = dequantize(torch.rand(3, 1, 8, 8) * 2 - 1, 17, generator=torch.Generator().manual_seed(0))
    eps1 = torch.randn(
        x0.shape, generator=torch.Generator().manual_seed(4)
    )  # the first forward draw

    def bound(level0, **kwargs):
        return negative_log_likelihood(
            pipe.ebm,
            schedule,
            settings,
            x0,
            data_scale=data_scale,
            initializer=pipe.initializer,
            num_intermediate=2,
            num_chains=2,
            top_log_normalizer=0.0,
            generator=torch.Generator().manual_seed(1),
            forward_generator=torch.Generator().manual_seed(4),
            level0=level0,
            **kwargs,
        )

    gaussian = bound("gaussian", level0_variance=VARIANCE)
    expected = hand_level0_term(pipe, x0, eps1, VARIANCE)
    torch.testing.assert_close(gaussian.terms[:, 0], expected, rtol=1e-6, atol=1e-6)
    assert gaussian.jacobian[0] == 0 and torch.isnan(gaussian.acceptance[:, 0]).all()
    torch.testing.assert_close(gaussian.nll, gaussian.terms.sum(1) + gaussian.data_scale_nats)
    # The other levels are the EBM's, at the same forward draws.
    ebm = bound("ebm")
    torch.testing.assert_close(gaussian.energy[:, 1:], ebm.energy[:, 1:])
    torch.testing.assert_close(gaussian.jacobian[1:], ebm.jacobian[1:])


def test_bits_per_dim_scores_a_conditional_model_with_the_null_label():
    pipe = pipeline(condition_sizes=(NUM_CLASSES,))
    x0 = torch.randint(0, 17, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 16 * 2 - 1
    out = bits_per_dim(
        pipe,
        x0,
        num_intermediate=2,
        num_chains=2,
        num_bins=17,
        generator=torch.Generator().manual_seed(1),
        data_generator=torch.Generator().manual_seed(2),
        level0="gaussian",
        level0_variance=VARIANCE,
        progress=False,
    )
    data = torch.Generator().manual_seed(2)  # bits_per_dim's data draws: dequantization, then eps_1
    x = dequantize(x0, 17, generator=data)
    eps1 = torch.randn(x.shape, generator=data)
    expected = hand_level0_term(pipe, x, eps1, VARIANCE, label=NUM_CLASSES)  # the null label
    assert out["per_level_nats"][0] == pytest.approx(expected.mean().item(), rel=1e-6)
    assert out["level0"] == "gaussian" and out["level0_variance"] == VARIANCE
    assert math.isfinite(out["bpd"])


def test_fitted_variance_is_the_mean_squared_decoder_error():
    pipe = pipeline(data_scale=2.0)
    x0 = torch.randint(0, 17, (5, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 16 * 2 - 1
    fitted = fit_level0_variance(pipe, x0, num_bins=17, generator=torch.Generator().manual_seed(3))
    data = torch.Generator().manual_seed(3)
    x = dequantize(x0, 17, generator=data) * 2.0
    schedule = pipe.scheduler.schedule
    alpha1 = float(schedule.alphas[1])
    x1 = math.sqrt(alpha1) * x + float(schedule.sigmas[1]) * torch.randn(x.shape, generator=data)
    with torch.no_grad():
        mean = pipe.initializer(x1, schedule.noise_levels[1].expand(5), None) / math.sqrt(alpha1)
    assert fitted == pytest.approx(float((x - mean).double().pow(2).mean()), rel=1e-6)
    # batches give the same kind of figure (other forward draws)
    batched = fit_level0_variance(pipe, x0, num_bins=17, batch_size=2)
    assert 0.3 * fitted < batched < 3 * fitted


def test_bad_level0_arguments_are_value_errors():
    pipe = pipeline()
    schedule, settings = pipe.scheduler.schedule, pipe.scheduler.langevin_settings()
    x0 = torch.zeros(1, 1, 8, 8)
    cases = [
        ({"level0": "exact"}, "unknown level0"),
        ({"level0": "gaussian"}, "needs level0_variance"),
        ({"level0": "gaussian", "level0_variance": 0.0}, "must be > 0"),
        ({"level0": "gaussian", "level0_variance": math.nan}, "finite"),
        ({"level0": "ebm", "level0_variance": 0.1}, "is for level0='gaussian'"),
        ({"level0": "gaussian", "level0_variance": 0.1, "initializer": None}, "initializer"),
    ]
    for kwargs, match in cases:
        kwargs = {"initializer": pipe.initializer, **kwargs}
        with pytest.raises(ValueError, match=match):
            negative_log_likelihood(pipe.ebm, schedule, settings, x0, **kwargs)
    drl = CDRLPipeline(ebm=pipe.ebm, initializer=None, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="initializer"):
        fit_level0_variance(drl, x0)


# ------------------------------------------------------------------ cdrl-evaluate --bpd_level0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("level0")
    pipe = pipeline()
    pipe.save_pretrained(root / "pipeline")
    CDRLPipeline(ebm=pipe.ebm, initializer=None, scheduler=pipe.scheduler).save_pretrained(
        root / "drl"
    )
    return root


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CDRL_CACHE_DIR", str(tmp_path / "cache"))


def run(argv, capsys):
    code = evaluate.main([str(a) for a in argv] + ["--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


BPD = ["--metrics", "bpd", "--heldout", "digits-test", "--num_examples", 2]
BPD += ["--bpd_num_chains", 2, "--bpd_num_intermediate", 2]


def test_cli_fits_the_variance_on_the_training_split(checkpoints, tmp_path, capsys):
    out = tmp_path / "bpd.json"
    argv = ["--checkpoint", checkpoints / "pipeline", *BPD, "--bpd_level0", "gaussian"]
    code, stdout, stderr = run([*argv, "--output", out], capsys)
    assert code == 0, stderr
    details = json.loads(out.read_text())["details"]["bpd"]
    assert (
        details["level0"] == "gaussian" and details["level0_variance_fitted_on"] == "digits-train"
    )
    assert details["level0_fit_examples"] == 1437
    # the same figure as the library's, on the training digits with the CLI's seed (0)
    train = load_dataset(DataConfig(name="digits"))
    x = torch.stack([train[i][0] for i in range(len(train))])
    pipe = CDRLPipeline.from_pretrained(checkpoints / "pipeline")
    fitted = fit_level0_variance(pipe, x, num_bins=17, generator=torch.Generator().manual_seed(0))
    assert details["level0_variance"] == pytest.approx(fitted, rel=1e-6)
    assert "level 0 as a Gaussian of variance" in stderr and "digits-train" in stderr
    assert (
        "2 examples x 4 levels" in stderr
    )  # AIS at levels 1-4 of 6 (level 0 exact, the top apart)
    assert math.isfinite(json.loads(out.read_text())["metrics"]["bpd"])
    # a given variance is used as it is, and the convergence check keeps it at both budgets
    argv += ["--bpd_level0_variance", 0.02, "--bpd_convergence", "--output", out]
    code, _, stderr = run(argv, capsys)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["details"]["bpd"]["level0_variance"] == 0.02
    assert "level0_variance_fitted_on" not in result["details"]["bpd"]
    assert all(r[0] < 1e6 for r in result["details"]["bpd_convergence"]["per_level_nats"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--bpd_level0", "exact"], "--bpd_level0: invalid choice"),
        (["--bpd_level0", "gaussian", "--bpd_level0_variance", 0], "must be > 0"),
        (["--bpd_level0", "gaussian", "--bpd_level0_variance", "nan"], "finite"),
        (["--bpd_level0_variance", 0.1], "--bpd_level0_variance is for --bpd_level0 gaussian"),
        (
            ["--bpd_level0", "gaussian", "--heldout", "FOLDER"],
            "has none; give --bpd_level0_variance",
        ),
        (["--bpd_level0", "gaussian", "--checkpoint", "DRL"], "needs an initializer"),
    ],
)
def test_cli_bad_level0_values_are_one_line_exit_2(checkpoints, tmp_path, capsys, extra, match):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "a.png")
    extra = [
        {"FOLDER": folder, "DRL": checkpoints / "drl"}.get(e, e) if isinstance(e, str) else e
        for e in extra
    ]
    argv = ["--checkpoint", checkpoints / "pipeline", *BPD, *extra, "--output", tmp_path / "o.json"]
    code, stdout, stderr = run(argv, capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert match in lines[0] and stdout == "" and not (tmp_path / "o.json").exists()


def test_level0_flags_are_for_bpd(checkpoints, tmp_path, capsys):
    argv = [
        "--checkpoint",
        checkpoints / "pipeline",
        "--metrics",
        "ood",
        "--reference",
        "digits-test",
    ]
    argv += ["--ood", tmp_path, "--bpd_level0", "gaussian", "--output", tmp_path / "o.json"]
    code, _, stderr = run(argv, capsys)
    assert code == 2 and "--bpd_level0 is for --metrics bpd" in stderr
