"""Tests of cdrl.evaluation.ais and .likelihood: AIS normalizers against closed forms and exact 2-D grids, the variational bound
against an independent exact computation, and bits_per_dim's conventions.

The 2-D model is a random EnergyMLP whose head is made non-positive and scaled, so that its energy
E = sum_j |w_j| relu(h_j(y)) is bounded below and grows in every direction: the top level is a proper
marginal EBM, and each recovery conditional differs from its Gaussian tether by several nats.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from experiment_scripts import load_experiment
from torch import nn

from cdrl.config import Config, LangevinConfig, save_config
from cdrl.evaluation.ais import annealing_schedule, log_normalizer_ais, log_normalizer_grid
from cdrl.evaluation.bpd import bits_per_dim, dequantize
from cdrl.evaluation.likelihood import level_energy_fn, negative_log_likelihood
from cdrl.models import EnergyMLP
from cdrl.schedule import cdrl_schedule

UNTEMPERED = LangevinConfig(tempered=False)  # T_t = 1: the random energies are O(1) nats
HEAD_SCALE = 10.0
GRID_POINTS = 201  # per dimension over x_{t+1} ± 10 sigma: spacing sigma / 10
TOP_BOX = (torch.zeros(1, 2), torch.tensor([3.0]))  # top-level AIS base N(0, 3^2), grid box ± 24


def confining_mlp(seed: int = 0, scale: float = HEAD_SCALE) -> EnergyMLP:
    torch.manual_seed(seed)
    ebm = EnergyMLP(in_features=2, hidden=16, channel_mult=(1, 2), num_res_blocks=1).eval()
    with torch.no_grad():
        ebm.head.weight.copy_(-scale * ebm.head.weight.abs())
    return ebm


@pytest.fixture(scope="module")
def mlp():
    return confining_mlp()


@pytest.fixture(scope="module")
def schedule():
    return cdrl_schedule(6)


def tethered_case(ebm, schedule, t: int, num: int = 6):
    """Level t's energy function and num points x_{t+1} ~ N(0, 1.5^2) with their sigma and tether."""
    fn = level_energy_fn(ebm, schedule, UNTEMPERED, t)
    gen = torch.Generator().manual_seed(100 + t)
    x_next = 1.5 * torch.randn(num, 2, generator=gen)
    sigma = torch.full((num,), float(schedule.sigmas[t + 1]))
    return fn, x_next, sigma, torch.ones(num)


# ------------------------------------------------------------------------ schedules, closed forms


@pytest.mark.parametrize("kind", ["linear", "sigmoid"])
def test_annealing_schedule_runs_from_zero_to_one(kind):
    betas = annealing_schedule(50, kind)
    assert betas.shape == (51,) and betas.dtype == torch.float64
    assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()
    with pytest.raises(ValueError, match="num_intermediate"):
        annealing_schedule(0)
    with pytest.raises(ValueError, match="unknown"):
        annealing_schedule(5, "cosine")


def quadratic(mean: torch.Tensor, v: float):
    """E(y) = ||y - mean_i||^2 / (2 v) for rows grouped per example i."""

    def energy(y):
        return (y - mean.repeat_interleave(y.shape[0] // mean.shape[0], 0)).pow(2).sum(1) / (2 * v)

    return energy


def tethered_gaussian_log_z(x, m, v: float, sigma: float) -> torch.Tensor:
    """log of the integral of exp(-||y - m||^2 / (2 v) - ||x - y||^2 / (2 sigma^2)) dy, per row."""
    dims, var = x.shape[1], v + sigma**2
    sq = (x - m).double().pow(2).sum(1)
    return 0.5 * dims * math.log(2 * math.pi * v * sigma**2 / var) - sq / (2 * var)


def test_ais_matches_the_gaussian_closed_form_in_8d():
    """In 8-D with 1000 annealing steps (at 100 the error is about 0.2 nats of variance)."""
    dims, b, v, sigma = 8, 6, 0.3, 0.5
    gen = torch.Generator().manual_seed(0)
    m, x = 0.5 * torch.randn(b, dims, generator=gen), 0.5 * torch.randn(b, dims, generator=gen)
    exact = tethered_gaussian_log_z(x, m, v, sigma)
    result = log_normalizer_ais(
        quadratic(m, v),
        x,
        torch.full((b,), sigma),
        torch.ones(b),
        num_intermediate=1000,
        generator=torch.Generator().manual_seed(1),
    )
    assert result.log_normalizer.shape == (b,) and result.log_normalizer.dtype == torch.float64
    assert (result.log_normalizer - exact).abs().max() < 0.1
    assert 0.4 < result.acceptance.mean() < 0.8  # the step adaptation reaches its target
    # Plain importance sampling from the tether (K = 1) is far off: the test has teeth.
    plain = log_normalizer_ais(
        quadratic(m, v),
        x,
        torch.full((b,), sigma),
        torch.ones(b),
        num_intermediate=1,
        generator=torch.Generator().manual_seed(1),
    )
    assert (plain.log_normalizer - exact).abs().mean() > 0.5

    # No tether (a marginal EBM) in 4-D, from the base N(0, I): Z = (2 pi v)^(D/2).
    m4 = m[:, :4]
    top = log_normalizer_ais(
        quadratic(m4, v),
        torch.zeros(b, 4),
        torch.ones(b),
        torch.zeros(b),
        base_mean=torch.zeros(b, 4),
        base_std=torch.ones(b),
        num_intermediate=300,
        num_chains=64,
        generator=torch.Generator().manual_seed(2),
    )
    assert (top.log_normalizer - 2 * math.log(2 * math.pi * v)).abs().max() < 0.1


def test_grid_matches_the_gaussian_closed_form():
    b, v, sigma = 3, 0.2, 0.4
    m, x = torch.tensor([[0.3, -0.2]]).expand(b, 2), torch.randn(b, 2)
    exact = tethered_gaussian_log_z(x, m, v, sigma)
    grid = log_normalizer_grid(quadratic(m, v), x, torch.full((b,), sigma), torch.ones(b))
    torch.testing.assert_close(grid, exact, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="vectors"):
        log_normalizer_grid(quadratic(m, v), torch.zeros(b, 1, 2), torch.ones(b), torch.ones(b))


# ---------------------------------------------------------------- AIS against the exact 2-D grid


def test_ais_agrees_with_the_exact_grid_at_default_settings(mlp, schedule):
    """Every tethered level of the CDRL schedule, 6 points x_{t+1} each: AIS at the defaults
    (100 annealing steps, 16 chains) against the grid. Per level, the mean error is below 0.05 nats."""
    errors, offsets = [], []
    for t in range(schedule.num_levels - 1):
        fn, x_next, sigma, tether = tethered_case(mlp, schedule, t)
        exact = log_normalizer_grid(fn, x_next, sigma, tether, num_points=GRID_POINTS)
        ais = log_normalizer_ais(
            fn, x_next, sigma, tether, generator=torch.Generator().manual_seed(t)
        )
        errors.append(ais.log_normalizer - exact)
        offsets.append(exact - torch.log(2 * math.pi * sigma.double() ** 2))
    errors, offsets = torch.stack(errors), torch.stack(offsets)
    assert offsets.abs().min() > 1.0  # every conditional is far from its tether (log Z differs)
    assert (errors.abs().mean(1) < 0.05).all(), errors
    assert errors.abs().max() < 0.15, errors


def test_ais_error_shrinks_as_annealing_steps_grow(mlp, schedule):
    """10 -> 100 -> 1000 annealing steps, one seed, mean absolute error over 6 x_{t+1} at the level
    with the widest tether (the hardest): it falls at each step and ends below 0.02 nats."""
    fn, x_next, sigma, tether = tethered_case(mlp, schedule, schedule.num_levels - 2)
    exact = log_normalizer_grid(fn, x_next, sigma, tether, num_points=GRID_POINTS)
    errors = []
    for num in (10, 100, 1000):
        ais = log_normalizer_ais(
            fn,
            x_next,
            sigma,
            tether,
            num_intermediate=num,
            generator=torch.Generator().manual_seed(0),
        )
        errors.append((ais.log_normalizer - exact).abs().mean().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.02 and errors[0] > 2 * errors[2], errors


def test_grid_is_converged(mlp, schedule):
    fn, x_next, sigma, tether = tethered_case(mlp, schedule, 0, num=2)
    coarse = log_normalizer_grid(fn, x_next, sigma, tether, num_points=GRID_POINTS)
    fine = log_normalizer_grid(
        fn, x_next, sigma, tether, num_points=2 * GRID_POINTS, half_width=12 * sigma
    )
    torch.testing.assert_close(coarse, fine, rtol=0, atol=1e-4)


# ---------------------------------------------------------- the whole bound, exactly, by hand


def reference_bound(ebm, schedule, x0, data_scale, seed, *, points=201):
    """The bound of negative_log_likelihood computed independently, in x-space, from its definition:
    -log p(x_{T-1}) - sum_t log p(x_t | x_{t+1}) + sum_t log q(x_{t+1} | x_t) - D log(data_scale), each
    conditional normalized by quadrature over x_t (not y), each q a Gaussian log-density."""
    num_levels, b = schedule.num_levels, x0.shape[0]
    alphas, sigmas = schedule.alphas.tolist(), schedule.sigmas.tolist()
    levels = schedule.noise_levels.float()
    gen = torch.Generator().manual_seed(seed)  # the same forward draws as negative_log_likelihood
    xs = [x0 * data_scale]
    for t in range(num_levels - 1):
        eps = torch.randn(x0.shape, generator=gen)
        xs.append(math.sqrt(alphas[t + 1]) * xs[-1] + sigmas[t + 1] * eps)

    def energy(y, t):
        with torch.no_grad():
            return ebm(y, levels[t].expand(y.shape[0])).double()

    def log_integral(log_f, center, half):
        unit = torch.linspace(-1, 1, points, dtype=torch.float64)
        nodes = center.double() + half * torch.cartesian_prod(unit, unit)
        return torch.logsumexp(log_f(nodes), 0) + 2 * math.log(2 * half / (points - 1))

    total = torch.zeros(b, dtype=torch.float64)
    for t in range(num_levels - 1):
        root, sigma = math.sqrt(alphas[t + 1]), sigmas[t + 1]
        for i in range(b):
            x_t, x_next = xs[t][i].double(), xs[t + 1][i].double()

            def log_f(x, x_next=x_next, t=t, root=root, sigma=sigma):
                sq = (x_next - root * x).pow(2).sum(-1)
                return -energy((root * x).float(), t) - sq / (2 * sigma**2)

            log_z = log_integral(log_f, x_next / root, 10 * sigma / root)
            log_p = log_f(x_t[None])[0] - log_z
            log_q = -math.log(2 * math.pi * sigma**2) - (x_next - root * x_t).pow(2).sum() / (
                2 * sigma**2
            )
            total[i] += log_q - log_p
    top = num_levels - 1
    log_z_top = log_integral(lambda x: -energy(x.float(), top), torch.zeros(2), 24.0)
    total += energy(xs[-1], top) + log_z_top
    return total - 2 * math.log(data_scale)


@pytest.fixture(scope="module")
def bound_case(mlp, schedule):
    x0 = torch.tensor([[0.5, -0.3], [-0.8, 0.6], [0.1, 0.9], [0.7, 0.7]])
    reference = reference_bound(mlp, schedule, x0, 2.0, seed=7)
    return x0, reference


def test_bound_with_grid_normalizers_matches_an_independent_exact_computation(
    mlp, schedule, bound_case
):
    x0, reference = bound_case
    result = negative_log_likelihood(
        mlp,
        schedule,
        UNTEMPERED,
        x0,
        data_scale=2.0,
        method="grid",
        grid_points=GRID_POINTS,
        top_base=TOP_BOX,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(result.nll, reference, rtol=0, atol=2e-3)
    # The pieces add up, and the data-scale Jacobian is -D log(scale).
    total = result.terms.sum(1) + result.data_scale_nats
    torch.testing.assert_close(result.nll, total, rtol=0, atol=1e-9)
    assert result.data_scale_nats == pytest.approx(-2 * math.log(2.0))
    alphas = schedule.alphas[1:].double()
    torch.testing.assert_close(result.jacobian[:-1], -torch.log(alphas[:-1]), rtol=0, atol=1e-12)


def test_bound_with_ais_normalizers_agrees_with_the_exact_bound(mlp, schedule, bound_case):
    """The same forward draws; AIS at the defaults for every level (the top with 256 chains):
    the total within 0.1 nats per example (5 tethered levels + the top, each within about 0.05)."""
    x0, reference = bound_case
    result = negative_log_likelihood(
        mlp,
        schedule,
        UNTEMPERED,
        x0,
        data_scale=2.0,
        top_base=TOP_BOX,
        generator=torch.Generator().manual_seed(7),
    )
    assert result.terms.shape == (4, schedule.num_levels)
    assert (result.nll - reference).abs().max() < 0.1, result.nll - reference
    assert torch.isfinite(result.acceptance).all() and (result.ess_fraction > 0).all()


class _TimesTemperature(nn.Module):
    """E(y, u) * T_t, with T_t the tempered temperature of the level whose noise input is u."""

    def __init__(self, ebm: nn.Module, schedule, settings: LangevinConfig) -> None:
        super().__init__()
        self.ebm = ebm
        self.register_buffer("levels", schedule.noise_levels[:-1].float())
        b2 = settings.b2
        self.register_buffer("temps", schedule.langevin_step_sizes(b2).float() ** 2)

    def forward(self, y, noise_level, cond=None):
        index = (noise_level[:, None] - self.levels[None]).abs().argmin(1)
        return self.ebm(y, noise_level, cond) * self.temps[index]


def test_tempering_divides_the_energy_by_the_level_temperature(mlp, schedule):
    """With tempering, the density is exp(-E / s_t^2): multiplying E by s_t^2 undoes it exactly."""
    x0 = torch.tensor([[0.2, -0.4], [0.6, 0.1]])
    common = dict(
        data_scale=1.5,
        method="grid",
        grid_points=101,
        top_base=TOP_BOX,
        generator=torch.Generator().manual_seed(3),
    )
    plain = negative_log_likelihood(mlp, schedule, UNTEMPERED, x0, **common)
    common["generator"] = torch.Generator().manual_seed(3)
    tempered = LangevinConfig(tempered=True)
    scaled = _TimesTemperature(mlp, schedule, tempered)
    undone = negative_log_likelihood(scaled, schedule, tempered, x0, **common)
    torch.testing.assert_close(undone.nll, plain.nll, rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------- bits per dim


def test_dequantize_spreads_each_pixel_over_its_own_bin():
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (500, 1, 2, 2), generator=gen).float()
    x0 = k / 255 * 2 - 1
    x = dequantize(x0, 256, generator=torch.Generator().manual_seed(1))
    # bit-exact: each value sits inside its bin (floor of an elementwise expression), not near an edge
    assert torch.equal(torch.floor((x + 1) / 2 * 256), k)
    frac = (x + 1) / 2 * 256 - k
    assert abs(frac.mean().item() - 0.5) < 0.02 and frac.min() >= 0 and frac.max() < 1
    digits = dequantize(torch.tensor([-1.0, 0.0, 1.0]), 17, generator=gen)
    assert torch.equal(torch.floor((digits + 1) / 2 * 17), torch.tensor([0.0, 8.0, 16.0]))


def test_bits_per_dim_on_images_reports_the_dequantized_discrete_nll(tiny_pipeline):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (3, 1, 8, 8), generator=gen).float() / 255 * 2 - 1
    out = bits_per_dim(
        tiny_pipeline,
        x0,
        num_intermediate=3,
        num_chains=2,
        batch_size=2,
        generator=torch.Generator().manual_seed(1),
    )
    dims = 64
    assert out["dims"] == dims and out["num_examples"] == 3 and len(out["nll_per_example"]) == 3
    assert "256" in out["convention"] and "dequantization" in out["convention"]
    assert out["dequantization_nats"] == pytest.approx(dims * math.log(128))
    assert out["bpd"] == pytest.approx(out["nll_nats"] / (dims * math.log(2)))
    assert out["nll_nats"] == pytest.approx(sum(out["nll_per_example"]) / 3)
    parts = sum(out["per_level_nats"]) + out["data_scale_nats"] + out["dequantization_nats"]
    assert out["nll_nats"] == pytest.approx(parts)
    assert len(out["per_level_nats"]) == tiny_pipeline.scheduler.schedule.num_levels
    assert all(math.isfinite(v) for v in out["nll_per_example"])
    again = bits_per_dim(
        tiny_pipeline,
        x0,
        num_intermediate=3,
        num_chains=2,
        batch_size=2,
        generator=torch.Generator().manual_seed(1),
    )
    assert (
        again["nll_per_example"] == out["nll_per_example"]
    )  # bit-exact: same seed, batch, process
    proposal = bits_per_dim(
        tiny_pipeline,
        x0[:1],
        num_intermediate=2,
        num_chains=2,
        base="proposal",
        generator=torch.Generator().manual_seed(1),
    )
    assert proposal["base"] == "proposal" and math.isfinite(proposal["nll_nats"])


class _GaussianDataModel(nn.Module):
    """The exact model of data x ~ N(0, v I): level t's energy is -log q(x_t) in its y-space.

    Under the forward process x_{t+1} = sqrt(a_{t+1}) x_t + s_{t+1} eps, q(x_t) = N(0, v_t I) with
    v_0 = v, v_{t+1} = a_{t+1} v_t + s_{t+1}^2. With E_t(y) = |y|^2 / (2 a_{t+1} v_t) at y = sqrt(a_{t+1})
    x_t (untempered) each tethered conditional is the true posterior q(x_t | x_{t+1}), and the top level
    is q(x_{T-1}): the bound telescopes to -log N(x; 0, v I) exactly, whatever the forward draws.
    """

    config: dict = {}

    def __init__(self, schedule, variance: float) -> None:
        super().__init__()
        alphas, variances = schedule.alphas.tolist(), [variance]
        for t in range(schedule.num_levels - 1):
            variances.append(alphas[t + 1] * variances[-1] + 1 - alphas[t + 1])
        widths = [alphas[t + 1] * v for t, v in enumerate(variances[:-1])] + [variances[-1]]
        self.register_buffer("levels", schedule.noise_levels[: schedule.num_levels].float())
        self.register_buffer("widths", torch.tensor(widths))
        self.unused = nn.Parameter(torch.zeros(()))  # bits_per_dim reads the device and dtype

    def forward(self, y, noise_level, cond=None):
        t = (noise_level[:, None] - self.levels[None]).abs().argmin(1)
        return y.flatten(1).pow(2).sum(1) / (2 * self.widths[t])


def test_bits_per_dim_on_vectors_is_continuous(mlp_pipeline):
    x0 = torch.tensor([[0.1, 0.2], [-0.3, 0.4], [0.5, -0.6]])
    out = bits_per_dim(
        mlp_pipeline,
        x0,
        num_intermediate=3,
        num_chains=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert out["dequantization_nats"] == 0.0 and "continuous" in out["convention"]
    assert out["bpd"] == pytest.approx(out["nll_nats"] / (2 * math.log(2)))
    assert out["ais_acceptance"][-1] == out["ais_acceptance"][-1]  # the top level ran AIS (not NaN)

    # A model whose likelihood is known in closed form: the exact Gaussian of the data's variance.
    from types import SimpleNamespace

    from cdrl.pipeline import CDRLScheduler

    variance = 0.25
    scheduler = CDRLScheduler(n_steps=3, tempered=False)
    model = _GaussianDataModel(scheduler.schedule, variance)
    x = 0.5 * torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    nll = x.pow(2).sum(1) / (2 * variance) + math.log(2 * math.pi * variance)  # -log N(x; 0, v I)
    # The bound with exact (grid) normalizers is the closed form, per example.
    grid = negative_log_likelihood(
        model,
        scheduler.schedule,
        scheduler.langevin_settings(),
        x[:4],
        method="grid",
        grid_points=GRID_POINTS,
        top_base=TOP_BOX,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(grid.nll, nll[:4].double(), rtol=0, atol=1e-3)
    # bits_per_dim (AIS normalizers, noisy per example): the mean within 0.3 nats of the closed form
    exact = SimpleNamespace(ebm=model, scheduler=scheduler, initializer=None)
    out = bits_per_dim(
        exact, x, num_intermediate=20, num_chains=16, generator=torch.Generator().manual_seed(0)
    )
    assert out["nll_nats"] == pytest.approx(nll.mean().item(), abs=0.3)
    assert out["bpd"] == pytest.approx(nll.mean().item() / (2 * math.log(2)), abs=0.3 / 1.38)


def test_unknown_method_and_missing_initializer_are_errors(mlp, schedule):
    x0 = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="method"):
        negative_log_likelihood(mlp, schedule, UNTEMPERED, x0, method="exact")
    with pytest.raises(ValueError, match="initializer"):
        negative_log_likelihood(mlp, schedule, UNTEMPERED, x0, base="proposal")


# --------------------------------------------------------------------- experiments/long_run.py


def test_long_run_script_records_each_level(tiny_pipeline, tmp_path):
    """The script on a tiny digits-shaped pipeline: every level's chain is measured at the checkpoint
    steps and the JSON has one row per recorded step (level 0 is left out: it loads the classifier)."""
    long_run = load_experiment("long_run")
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    save_config(Config(), tmp_path / "pipe" / "training_config.yaml")  # data: digits
    out = tmp_path / "long_run.json"
    argv = ["--checkpoint", str(tmp_path / "pipe"), "--num_steps", "16", "--num_images", "4"]
    argv += ["--levels", "1,5", "--output", str(out)]  # (a --plot adds seconds of matplotlib)
    assert long_run.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["levels"]) == {"1", "5"} and result["num_images"] == 4
    for rows in result["levels"].values():
        assert [row["step"] for row in rows] == [0, 15, 16]
        assert rows[0]["move_rms"] == 0 and rows[-1]["move_rms"] > 0
        assert all(math.isfinite(row["energy"]) and row["error_rms"] > 0 for row in rows)
