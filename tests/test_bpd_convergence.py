"""The convergence check of held-out bits/dim (issue 17): ``cdrl.evaluation.bpd.bpd_convergence``
and ``convergence_criterion``, pinned on 2-D models whose exact bound is computed on the grid.

The models are the random confining EnergyMLPs of tests/test_density.py (head made non-positive and
scaled, so that the top level is a proper marginal EBM and each conditional is far from its tether). The
exact figure is ``negative_log_likelihood`` with grid normalizers at the same forward draws x_{1:T-1}.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cdrl.evaluation.bpd import CONVERGENCE_TOLERANCE, bpd_convergence, convergence_criterion
from cdrl.evaluation.likelihood import negative_log_likelihood
from cdrl.models import EnergyMLP
from cdrl.pipeline import CDRLScheduler

GRID_POINTS = 201  # per dimension over x_{t+1} ± 10 sigma, as in test_density.py
TOP_BOX = (torch.zeros(1, 2), torch.tensor([3.0]))  # the top level's grid box: ± 24
NUM_EXAMPLES = 24
SEED = 5


def confining_pipeline(seed: int, scale: float) -> SimpleNamespace:
    """A 6-level untempered 2-D model: E = sum_j |w_j| relu(h_j(y)), |w| scaled by ``scale``."""
    torch.manual_seed(seed)
    ebm = EnergyMLP(in_features=2, hidden=16, channel_mult=(1, 2), num_res_blocks=1).eval()
    with torch.no_grad():
        ebm.head.weight.copy_(-scale * ebm.head.weight.abs())
    scheduler = CDRLScheduler(num_levels=6, n_steps=3, tempered=False)
    return SimpleNamespace(ebm=ebm, scheduler=scheduler, initializer=None)


def data() -> torch.Tensor:
    return 0.6 * torch.randn(NUM_EXAMPLES, 2, generator=torch.Generator().manual_seed(0))


def exact_nll(pipe, x: torch.Tensor) -> torch.Tensor:
    """The bound with grid normalizers at the forward draws of a data generator seeded SEED (the draws
    ``bpd_convergence`` makes for vectors: no dequantization, then the forward noise of the one batch)."""
    return negative_log_likelihood(
        pipe.ebm,
        pipe.scheduler.schedule,
        pipe.scheduler.langevin_settings(),
        x,
        method="grid",
        grid_points=GRID_POINTS,
        top_base=TOP_BOX,
        generator=torch.Generator().manual_seed(SEED),
    ).nll


def test_criterion_needs_a_small_move_and_agreement_within_the_standard_errors():
    assert CONVERGENCE_TOLERANCE == 0.01
    relative, converged = convergence_criterion((100.0, 100.5), (1.0, 1.0))
    assert relative == pytest.approx(0.5 / 100.5) and converged
    assert not convergence_criterion((100.0, 102.0), (5.0, 5.0))[1]  # moved by 2%
    assert not convergence_criterion((100.0, 100.5), (0.2, 0.2))[1]  # 0.5 > sqrt(0.08): disagree
    assert not convergence_criterion((100.0, 100.1), (math.nan, math.nan))[1]  # one example
    assert not convergence_criterion((-0.001, 0.0), (1.0, 1.0))[1]  # no relative scale at 0


def test_converged_estimate_agrees_with_the_exact_grid_figure():
    """K = 50 and 4K = 200 annealing steps, 16 chains: both AIS figures within their standard errors of
    the exact bound and within 0.05 nats of it on average (the AIS error, not the data's spread), and
    the criterion says converged."""
    pipe, x = confining_pipeline(0, 10.0), data()
    exact = exact_nll(pipe, x)
    check = bpd_convergence(
        pipe,
        x,
        num_bins=None,
        seed=SEED,
        batch_size=NUM_EXAMPLES,
        num_intermediate=50,
        num_chains=16,
        progress=False,
    )
    assert check.num_intermediate == (50, 200)
    mean, stderr = exact.mean().item(), exact.std().item() / math.sqrt(NUM_EXAMPLES)
    for nll, se in zip(check.nll_nats, check.nll_stderr_nats, strict=True):
        assert abs(nll - mean) <= se, (nll, mean, se)
        assert abs(nll - mean) < 0.05, (nll, mean)
        assert se == pytest.approx(stderr, rel=0.1)
    assert check.converged and check.relative_change < CONVERGENCE_TOLERANCE, check
    assert check.bpd[1] == pytest.approx(check.nll_nats[1] / (2 * math.log(2)))
    # The same examples and forward draws in both runs: the energies at x_{0:T-1} are identical.
    first, second = check.reports
    assert first["per_level_energy"] == second["per_level_energy"]
    assert (first["num_intermediate"], second["num_intermediate"]) == (50, 200)


def test_plain_importance_sampling_on_a_sharp_model_is_not_converged():
    """K = 1 (plain importance sampling from the tethers) on a model 4x sharper: the estimate moves by
    more than 1% at 4K and the check says so; at K = 1 it is far from the exact figure."""
    pipe, x = confining_pipeline(1, 40.0), data()
    exact = exact_nll(pipe, x).mean().item()
    check = bpd_convergence(
        pipe,
        x,
        num_bins=None,
        seed=SEED,
        batch_size=NUM_EXAMPLES,
        num_intermediate=1,
        num_chains=4,
        progress=False,
    )
    assert check.num_intermediate == (1, 4)
    assert not check.converged and check.relative_change > CONVERGENCE_TOLERANCE, check
    assert abs(check.nll_nats[0] - exact) > 0.05 * abs(exact), (check.nll_nats, exact)


def test_factor_below_two_is_refused():
    pipe = confining_pipeline(0, 10.0)
    with pytest.raises(ValueError, match="factor"):
        bpd_convergence(pipe, data(), num_bins=None, seed=0, batch_size=4, factor=1)
