"""The initializer's Gaussian levels in the density bound (issue 17, experiments/results/density.md):
``negative_log_likelihood(..., gaussian_levels=L)``, ``fit_level_variances``, ``model_gaussian_levels``,
``bits_per_dim`` and ``cdrl-evaluate --bpd_gaussian_levels``, on tiny 8x8 pipelines, against computations
written out by hand."""

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
from cdrl.evaluation.bpd import bits_per_dim, fit_level_variances, model_gaussian_levels
from cdrl.evaluation.likelihood import negative_log_likelihood
from cdrl.pipeline import CDRLPipeline, CDRLScheduler

VARIANCES = [0.01, 0.03]


def pipeline(
    condition_sizes: tuple[int, ...] = (), data_scale: float = 1.0, refine_top: int | None = None
) -> CDRLPipeline:
    # a non-trivial mean (the output layer is zero-initialized)
    initializer = _randomize_output(build_initializer(condition_sizes=condition_sizes))
    scheduler = CDRLScheduler(n_steps=3, data_scale=data_scale, refine_top=refine_top)
    pipe = CDRLPipeline(
        ebm=build_ebm(condition_sizes=condition_sizes), initializer=initializer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def forward(pipe, x0, eps):
    """x_0 = data_scale * x0, then x_{t+1} = sqrt(alpha_{t+1}) x_t + sigma_{t+1} eps[t], in float64."""
    alphas = pipe.scheduler.schedule.alphas.double()
    xs = [x0.double() * pipe.scheduler.config.data_scale]
    for t, e in enumerate(eps):
        xs.append(alphas[t + 1].sqrt() * xs[-1] + torch.sqrt(1 - alphas[t + 1]) * e.double())
    return xs


def hand_term(pipe, xs, t, variance, label=None):
    """-log N(x_t; m_t(x_{t+1}), v I) + log q(x_{t+1} | x_t) with torch.distributions; m_t = the
    initializer's output at level t+1's noise input over sqrt(alpha_{t+1}); label: the class fed to a
    conditional initializer."""
    schedule = pipe.scheduler.schedule
    alpha = schedule.alphas[t + 1].double()
    x, x_next = xs[t], xs[t + 1]
    b = x.shape[0]
    cond = None if label is None else torch.full((b, 1), label, dtype=torch.long)
    noise = schedule.noise_levels[t + 1].expand(b)
    with torch.no_grad():
        mean = pipe.initializer(x_next.float(), noise, cond).double() / alpha.sqrt()
    log_model = Normal(mean, math.sqrt(variance)).log_prob(x).flatten(1).sum(1)
    log_forward = Normal(alpha.sqrt() * x, torch.sqrt(1 - alpha)).log_prob(x_next).flatten(1).sum(1)
    return -log_model + log_forward


@pytest.mark.parametrize("data_scale", [1.0, 2.0])
def test_gaussian_level_terms_are_the_hand_computation(data_scale):
    pipe = pipeline(data_scale=data_scale)
    schedule, settings = pipe.scheduler.schedule, pipe.scheduler.langevin_settings()
    x0 = dequantize(torch.rand(3, 1, 8, 8) * 2 - 1, 17, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(4)  # the forward draws, level by level
    eps = [torch.randn(x0.shape, generator=gen) for _ in range(schedule.num_levels - 1)]
    xs = forward(pipe, x0, eps)

    def bound(levels, variances=None):
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
            gaussian_levels=levels,
            gaussian_variances=variances,
        )

    gaussian = bound(2, VARIANCES)
    for t in range(2):
        expected = hand_term(pipe, xs, t, VARIANCES[t])
        torch.testing.assert_close(gaussian.terms[:, t], expected, rtol=1e-6, atol=1e-6)
        assert gaussian.jacobian[t] == 0 and torch.isnan(gaussian.acceptance[:, t]).all()
    torch.testing.assert_close(gaussian.nll, gaussian.terms.sum(1) + gaussian.data_scale_nats)
    # The other levels are the EBM's, at the same forward draws.
    ebm = bound(0)
    torch.testing.assert_close(gaussian.energy[:, 2:], ebm.energy[:, 2:])
    torch.testing.assert_close(gaussian.jacobian[2:], ebm.jacobian[2:])
    assert not torch.isnan(ebm.acceptance[:, :2]).any()


def test_every_level_but_the_top_gaussian_is_the_initializer_chain():
    """L = T - 1: the bound is the initializer chain's, exact, whatever the AIS settings."""
    pipe = pipeline()
    schedule, settings = pipe.scheduler.schedule, pipe.scheduler.langevin_settings()
    levels = schedule.num_levels - 1
    variances = [0.01 * (t + 1) for t in range(levels)]
    x0 = dequantize(torch.rand(2, 1, 8, 8) * 2 - 1, 17, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(5)
    xs = forward(pipe, x0, [torch.randn(x0.shape, generator=gen) for _ in range(levels)])
    runs = [
        negative_log_likelihood(
            pipe.ebm,
            schedule,
            settings,
            x0,
            initializer=pipe.initializer,
            num_intermediate=k,
            num_chains=2,
            top_log_normalizer=0.0,
            generator=torch.Generator().manual_seed(k),
            forward_generator=torch.Generator().manual_seed(5),
            gaussian_levels=levels,
            gaussian_variances=variances,
        )
        for k in (2, 8)
    ]
    torch.testing.assert_close(runs[0].terms[:, :-1], runs[1].terms[:, :-1])
    expected = sum(hand_term(pipe, xs, t, variances[t]) for t in range(levels))
    torch.testing.assert_close(runs[0].terms[:, :-1].sum(1), expected, rtol=1e-6, atol=1e-6)


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
        gaussian_levels=2,
        gaussian_variances=VARIANCES,
        progress=False,
    )
    data = torch.Generator().manual_seed(2)  # bits_per_dim's data draws: dequantization, then eps
    x = dequantize(x0, 17, generator=data)
    xs = forward(pipe, x, [torch.randn(x.shape, generator=data) for _ in range(2)])
    for t in range(2):
        expected = hand_term(pipe, xs, t, VARIANCES[t], label=NUM_CLASSES)  # the null label
        assert out["per_level_nats"][t] == pytest.approx(expected.mean().item(), rel=1e-6)
    assert out["gaussian_levels"] == 2 and out["gaussian_variances"] == VARIANCES
    assert math.isfinite(out["bpd"])


def test_fitted_variances_are_the_mean_squared_errors_of_each_level():
    pipe = pipeline(data_scale=2.0)
    x0 = torch.randint(0, 17, (5, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 16 * 2 - 1
    fitted = fit_level_variances(
        pipe, x0, 3, num_bins=17, generator=torch.Generator().manual_seed(3)
    )
    data = torch.Generator().manual_seed(3)
    x = dequantize(x0, 17, generator=data)
    xs = forward(pipe, x, [torch.randn(x.shape, generator=data) for _ in range(3)])
    schedule = pipe.scheduler.schedule
    assert len(fitted) == 3
    for t in range(3):
        alpha = float(schedule.alphas[t + 1])
        with torch.no_grad():
            mean = pipe.initializer(
                xs[t + 1].float(), schedule.noise_levels[t + 1].expand(5), None
            ) / math.sqrt(alpha)
        assert fitted[t] == pytest.approx(float((xs[t] - mean).pow(2).mean()), rel=1e-5)
    # batches give the same kind of figures (other forward draws)
    batched = fit_level_variances(pipe, x0, 3, num_bins=17, batch_size=2)
    assert all(0.3 * f < b < 3 * f for f, b in zip(fitted, batched, strict=True))


def test_the_models_own_chain_is_gaussian_below_its_refined_levels():
    assert model_gaussian_levels(pipeline()) == 0  # every level refined
    assert model_gaussian_levels(pipeline(refine_top=2)) == 4  # 6 levels: Langevin at 4 and 5
    assert model_gaussian_levels(pipeline(refine_top=0)) == 5  # the top level stays the EBM's
    drl = pipeline(refine_top=2)
    drl.initializer = None
    assert model_gaussian_levels(drl) == 0


def test_bad_gaussian_level_arguments_are_value_errors():
    pipe = pipeline()
    schedule, settings = pipe.scheduler.schedule, pipe.scheduler.langevin_settings()
    x0 = torch.zeros(1, 1, 8, 8)
    cases = [
        ({"gaussian_levels": -1}, "must be an integer in"),
        ({"gaussian_levels": 6}, "must be an integer in"),
        ({"gaussian_levels": 1.0}, "must be an integer in"),
        ({"gaussian_levels": 2}, "needs 2 variances, got none"),
        ({"gaussian_levels": 2, "gaussian_variances": [0.1]}, "needs 2 variances, got 1"),
        ({"gaussian_levels": 1, "gaussian_variances": [0.0]}, "must be > 0"),
        ({"gaussian_levels": 1, "gaussian_variances": [math.nan]}, "finite"),
        ({"gaussian_levels": 0, "gaussian_variances": [0.1]}, "are for gaussian_levels > 0"),
        ({"gaussian_levels": 1, "gaussian_variances": [0.1], "initializer": None}, "initializer"),
    ]
    for kwargs, match in cases:
        kwargs = {"initializer": pipe.initializer, **kwargs}
        with pytest.raises(ValueError, match=match):
            negative_log_likelihood(pipe.ebm, schedule, settings, x0, **kwargs)
    drl = CDRLPipeline(ebm=pipe.ebm, initializer=None, scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match="initializer"):
        fit_level_variances(drl, x0, 1)
    with pytest.raises(ValueError, match=r"num_levels must be in \[1, 5\]"):
        fit_level_variances(pipe, x0, 6)


# ------------------------------------------------------------ cdrl-evaluate --bpd_gaussian_levels


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gaussian_levels")
    pipe = pipeline()
    pipe.save_pretrained(root / "pipeline")
    CDRLPipeline(ebm=pipe.ebm, initializer=None, scheduler=pipe.scheduler).save_pretrained(
        root / "drl"
    )
    top2 = pipeline(refine_top=2)
    top2.save_pretrained(root / "top2")
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


def test_cli_fits_the_variances_on_the_training_split(checkpoints, tmp_path, capsys):
    out = tmp_path / "bpd.json"
    argv = ["--checkpoint", checkpoints / "pipeline", *BPD, "--bpd_gaussian_levels", 2]
    code, stdout, stderr = run([*argv, "--output", out], capsys)
    assert code == 0, stderr
    details = json.loads(out.read_text())["details"]["bpd"]
    assert details["gaussian_levels"] == 2
    assert details["gaussian_variances_fitted_on"] == "digits-train"
    assert details["gaussian_fit_examples"] == 1437
    # the same figures as the library's, on the training digits with the CLI's seed (0)
    train = load_dataset(DataConfig(name="digits"))
    x = torch.stack([train[i][0] for i in range(len(train))])
    pipe = CDRLPipeline.from_pretrained(checkpoints / "pipeline")
    fitted = fit_level_variances(
        pipe, x, 2, num_bins=17, generator=torch.Generator().manual_seed(0)
    )
    assert details["gaussian_variances"] == pytest.approx(fitted, rel=1e-6)
    assert (
        "the lowest 2 levels as the initializer's Gaussians" in stderr and "digits-train" in stderr
    )
    assert "2 examples x 3 levels" in stderr  # AIS at levels 2-4 of 6 (0-1 exact, the top apart)
    assert math.isfinite(json.loads(out.read_text())["metrics"]["bpd"])
    # given variances are used as they are, and the convergence check keeps them at both budgets
    argv += ["--bpd_gaussian_variances", 0.02, 0.05, "--bpd_convergence", "--output", out]
    code, _, stderr = run(argv, capsys)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["details"]["bpd"]["gaussian_variances"] == [0.02, 0.05]
    assert "gaussian_variances_fitted_on" not in result["details"]["bpd"]
    per_level = result["details"]["bpd_convergence"]["per_level_nats"]
    assert per_level[0][:2] == pytest.approx(per_level[1][:2])  # exact: the same at K and 4K


def test_cli_default_is_every_level_below_the_top(checkpoints, tmp_path, capsys):
    out = tmp_path / "bpd.json"
    for name, levels in (("top2", 5), ("pipeline", 5), ("drl", 0)):
        argv = ["--checkpoint", checkpoints / name, *BPD, "--output", out]
        code, _, stderr = run(argv, capsys)
        assert code == 0, stderr
        assert json.loads(out.read_text())["details"]["bpd"]["gaussian_levels"] == levels
    # all, said outright, is the same; sampler is the chain the model samples; 0 is every level by AIS
    argv = ["--checkpoint", checkpoints / "top2", *BPD, "--output", out, "--bpd_gaussian_levels"]
    for value, levels in (("all", 5), ("sampler", 4), ("0", 0)):
        code, _, stderr = run([*argv, value], capsys)
        assert code == 0, stderr
        assert json.loads(out.read_text())["details"]["bpd"]["gaussian_levels"] == levels
    argv = ["--checkpoint", checkpoints / "pipeline", *BPD, "--output", out]
    code, _, stderr = run(
        [*argv, "--bpd_gaussian_levels", "sampler"], capsys
    )  # refines every level
    assert code == 0 and json.loads(out.read_text())["details"]["bpd"]["gaussian_levels"] == 0


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--bpd_gaussian_levels", "some"], "must be an integer, all or sampler"),
        (["--bpd_gaussian_levels", 6], "must be in [0, 5]"),
        (["--bpd_gaussian_levels", 1, "--bpd_gaussian_variances", 0], "must be finite and > 0"),
        (["--bpd_gaussian_levels", 1, "--bpd_gaussian_variances", "nan"], "must be finite"),
        (["--bpd_gaussian_levels", 2, "--bpd_gaussian_variances", 0.1], "gives 1 values for 2"),
        (["--bpd_gaussian_variances", 0.1], "gives 1 values for 5"),
        (
            ["--bpd_gaussian_levels", 1, "--heldout", "FOLDER"],
            "has none; give --bpd_gaussian_variances",
        ),
        (["--bpd_gaussian_levels", 1, "--checkpoint", "DRL"], "needs an initializer"),
    ],
)
def test_cli_bad_gaussian_level_values_are_one_line_exit_2(
    checkpoints, tmp_path, capsys, extra, match
):
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


def test_gaussian_level_flags_are_for_bpd(checkpoints, tmp_path, capsys):
    argv = [
        "--checkpoint",
        checkpoints / "pipeline",
        "--metrics",
        "ood",
        "--reference",
        "digits-test",
    ]
    argv += ["--ood", tmp_path, "--bpd_gaussian_levels", 1, "--output", tmp_path / "o.json"]
    code, _, stderr = run(argv, capsys)
    assert code == 2 and "--bpd_gaussian_levels is for --metrics bpd" in stderr


def test_ood_by_the_density_bound(checkpoints, tmp_path, capsys):
    """--ood_score nll scores every set by the bound's NLL with bpd's settings: the in-distribution
    figure is bpd's per-example NLL, and far-off images score worse."""
    folder = tmp_path / "far"
    folder.mkdir()
    for i in range(2):
        Image.new("L", (8, 8), color=255 * (i % 2)).save(folder / f"{i}.png")
    out = tmp_path / "ood.json"
    argv = ["--checkpoint", checkpoints / "top2", "--metrics", "bpd", "ood", "--ood_score", "nll"]
    argv += ["--heldout", "digits-test", "--num_examples", 2, "--ood", folder, "--output", out]
    argv += ["--bpd_num_chains", 2, "--bpd_num_intermediate", 2]
    code, _, stderr = run(argv, capsys)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    ood = result["details"]["ood"]
    assert ood["score"] == "nll" and ood["gaussian_levels"] == 5 and ood["num_bins"] == 17
    assert ood["in_distribution"]["nll_mean"] == pytest.approx(result["metrics"]["nll_nats"])
    assert ood["gaussian_variances"] == result["details"]["bpd"]["gaussian_variances"]
    assert 0.0 <= result["metrics"]["ood_auroc"][str(folder)] <= 1.0
    assert stderr.count("as the initializer's Gaussians") == 1  # fitted once for both metrics


def test_ood_report_takes_any_score_lower_is_in_distribution():
    from cdrl.evaluation.ood import ood_report

    pipe = pipeline()
    x_in, x_far = torch.zeros(3, 1, 8, 8), torch.ones(2, 1, 8, 8)
    report = ood_report(
        pipe,
        x_in,
        {"far": x_far},
        score=lambda x: x.flatten(1).sum(1),
        score_name="nll",
        progress=False,
    )
    assert report["score"] == "nll" and report["in_distribution"]["nll_mean"] == 0.0
    assert report["out_of_distribution"]["far"] == {
        "num_examples": 2,
        "nll_mean": 64.0,
        "nll_std": 0.0,
        "auroc": 1.0,
    }


def test_ood_score_is_for_ood(checkpoints, tmp_path, capsys):
    argv = ["--checkpoint", checkpoints / "top2", *BPD, "--ood_score", "nll"]
    code, _, stderr = run([*argv, "--output", tmp_path / "o.json"], capsys)
    assert code == 2 and "--ood_score is for --metrics ood" in stderr


def test_a_dequantized_model_samples_on_the_data_grid():
    from cdrl.config import load_config

    cfg = load_config(overrides=["data.dequantize=true"])
    assert CDRLScheduler.from_training_config(cfg).config.num_bins == 17
    assert CDRLScheduler.from_training_config(load_config()).config.num_bins is None
    pipe = pipeline()
    plain = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert not torch.allclose(plain * 16, (plain * 16).round())  # off the grid
    pipe.scheduler.register_to_config(num_bins=17)
    grid = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(grid * 16, (grid * 16).round())  # k / 16 in [0, 1]
    assert (grid - plain).abs().max() <= 1 / 16 + 1e-6  # each sample's own bin
    with pytest.raises(ValueError, match="num_bins"):
        CDRLScheduler(num_bins=1)


def test_ood_by_energy_is_refused_where_level_0_was_never_trained(checkpoints, tmp_path, capsys):
    """A train.refine_top run's level-0 EBM is an untrained network: its energy is no OOD score."""
    from cdrl.config import load_config, save_config

    folder = tmp_path / "top2"
    CDRLPipeline.from_pretrained(checkpoints / "top2").save_pretrained(folder)
    save_config(
        load_config(
            overrides=["schedule.num_levels=6", "train.refine_top=2", "langevin.refine_top=2"]
            + ["langevin.tweedie=false"]
        ),
        folder / "training_config.yaml",
    )
    argv = [
        "--checkpoint",
        folder,
        "--metrics",
        "ood",
        "--heldout",
        "digits-test",
        "--ood",
        tmp_path,
    ]
    capsys.readouterr()  # the loading bar above
    code, stdout, stderr = run([*argv, "--output", tmp_path / "o.json"], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and stdout == "", stderr
    assert "never trained (train.refine_top: 2 of 6 levels); use --ood_score nll" in lines[0]
    assert not (tmp_path / "o.json").exists()
    # every level trained: the energy is the default score, as before
    save_config(load_config(overrides=["schedule.num_levels=6"]), folder / "training_config.yaml")
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    argv += ["--num_examples", 2, "--output", tmp_path / "o.json"]
    code, _, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert json.loads((tmp_path / "o.json").read_text())["details"]["ood"]["score"] == "energy"
