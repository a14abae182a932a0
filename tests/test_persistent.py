"""Tests of the persistent chains at the lowest levels (cdrl.training.persistent, train.persistent_*): which
negatives they replace, what they continue from, restarts, checkpointing and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate, train_debug

from cdrl.config import ConfigError, load_config
from cdrl.training.persistent import PersistentChains

ROOT = Path(__file__).resolve().parents[1]
PCD = [
    "--set",
    "train.persistent_levels=2",
    "train.persistent_fraction=1.0",
    "train.persistent_size=2",
    "train.persistent_reset=0.0",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


class Recorder:
    """A chain runner that records what it was asked to continue and adds 100 to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, y, x_next, t, cond):
        self.calls.append(
            (y.clone(), x_next.clone(), t.clone(), None if cond is None else cond.clone())
        )
        return y + 100.0


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0, 1, 0, 2, 0, 1])[:b]
    y = torch.randn(b, 1, 2, 2, generator=g)
    x_next = torch.randn(b, 1, 2, 2, generator=g)
    cond = torch.randint(0, 10, (b, 1), generator=g)
    return t, y, x_next, cond


def _stored(chains, lv=0, key=None):
    """All filled states of a level (optionally one label key), as a sorted list of tuples."""
    out = []
    for (level, k), buf in chains.buffers.items():
        if level == lv and (key is None or k == key):
            out += [tuple(v.flatten().tolist()) for v in buf["y"][buf["filled"]]]
    return sorted(out)


def test_first_use_fills_the_chains_with_the_fresh_negatives_and_changes_nothing():
    chains = PersistentChains(1, 8, fraction=1.0, reset=0.0)
    t, y, x_next, _ = _batch()
    run = Recorder()
    neg, continued = chains.negatives(t, y, x_next, None, run)
    assert run.calls == [] and not continued.any()
    torch.testing.assert_close(neg, y)
    assert list(chains.buffers) == [(0, 0)]  # level 0 only; one key without labels
    assert _stored(chains) == sorted(tuple(v.flatten().tolist()) for v in y[t == 0])


def test_later_uses_continue_the_stored_chains_with_their_own_tether():
    torch.manual_seed(0)
    chains = PersistentChains(1, 3, fraction=1.0, reset=0.0)
    t, y, x_next, _ = _batch()
    chains.negatives(t, y, x_next, None, Recorder())  # fills all 3 slots from examples 0, 2, 4
    t2, y2, x_next2, _ = _batch(seed=1)
    run = Recorder()
    neg, continued = chains.negatives(t2, y2, x_next2, None, run)
    assert continued.tolist() == [True, False, True, False, True, False]
    ((y_in, x_in, t_in, c_in),) = run.calls
    assert t_in.tolist() == [0, 0, 0] and c_in is None
    # each continued chain starts from a stored state, tethered to that state's own x_{t+1}
    first = {tuple(v.flatten().tolist()): i for i, v in enumerate(y[t == 0])}
    for k in range(3):
        torch.testing.assert_close(
            x_in[k], x_next[t == 0][first[tuple(y_in[k].flatten().tolist())]]
        )
    torch.testing.assert_close(neg[continued], y_in + 100.0)
    # the other levels keep their fresh negatives, and the chains now hold the continued states
    torch.testing.assert_close(neg[~continued], y2[~continued])
    assert _stored(chains) == sorted(tuple(v.flatten().tolist()) for v in y_in + 100.0)


def test_a_chain_only_ever_serves_examples_with_its_own_labels():
    """Positives and negatives must carry the same labels, or per-label energy offsets random-walk."""
    torch.manual_seed(0)
    chains = PersistentChains(1, 1, fraction=1.0, reset=0.0, condition_sizes=(10,))
    t = torch.zeros(3, dtype=torch.long)
    y, x_next = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    chains.negatives(
        t, y, x_next, torch.tensor([[3], [10], [7]]), Recorder()
    )  # 10 is the null label
    assert sorted(chains.buffers) == [(0, 3), (0, 7), (0, 10)]
    run = Recorder()
    cond2 = torch.tensor([[7], [3], [10], [5]])
    _, continued = chains.negatives(
        torch.zeros(4, dtype=torch.long),
        torch.randn(4, 1, 2, 2),
        torch.randn(4, 1, 2, 2),
        cond2,
        run,
    )
    assert continued.tolist() == [
        True,
        True,
        True,
        False,
    ]  # label 5 has no chain yet: it starts one
    ((y_in, x_in, _, c_in),) = run.calls
    assert sorted(c_in[:, 0].tolist()) == [3, 7, 10]
    origin = {3: 0, 10: 1, 7: 2}  # which first-call example started each label's chain
    for state, tether, label in zip(y_in, x_in, c_in[:, 0].tolist(), strict=True):
        torch.testing.assert_close(state, y[origin[label]])
        torch.testing.assert_close(tether, x_next[origin[label]])
    # size is split evenly among the label values: 256 chains over 11 values -> 24 each
    assert PersistentChains(1, 256, fraction=1.0, reset=0.0, condition_sizes=(10,)).per_key == 24
    # two conditions: the key is mixed radix over (size + 1) values each
    two = PersistentChains(1, 2, fraction=1.0, reset=0.0, condition_sizes=(10, 2))
    two.negatives(
        torch.zeros(2, dtype=torch.long),
        y[:2],
        x_next[:2],
        torch.tensor([[3, 1], [3, 2]]),
        Recorder(),
    )
    assert sorted(two.buffers) == [(0, 3 * 3 + 1), (0, 3 * 3 + 2)]


def test_reset_one_always_restarts_and_fraction_zero_never_touches_the_chains():
    t, y, x_next, _ = _batch()
    chains = PersistentChains(2, 4, fraction=1.0, reset=1.0)
    run = Recorder()
    for seed in range(3):
        _, continued = chains.negatives(t, y + seed, x_next, None, run)
        assert not continued.any()
    assert run.calls == []
    # a restart stores the example's own x_{t+1}: the tether moves with the chain's new start
    buf = chains.buffers[(1, 0)]
    assert {tuple(v.flatten().tolist()) for v in buf["x_next"][buf["filled"]]} == {
        tuple(v.flatten().tolist()) for v in x_next[t == 1]
    }
    off = PersistentChains(2, 4, fraction=0.0, reset=0.0)
    neg, continued = off.negatives(t, y, x_next, None, Recorder())
    # bit-exact: with fraction 0 the negatives are y itself, untouched
    assert off.buffers == {} and not continued.any() and torch.equal(neg, y)


def test_state_dict_round_trip_and_a_size_mismatch_is_refused():
    chains = PersistentChains(1, 4, fraction=1.0, reset=0.0, condition_sizes=(10,))
    assert chains.state_dict() == {}
    t, y, x_next, cond = _batch()
    chains.negatives(t, y, x_next, cond, Recorder())
    copy = PersistentChains(1, 4, fraction=1.0, reset=0.0, condition_sizes=(10,))
    copy.load_state_dict(chains.state_dict())
    assert sorted(copy.buffers) == sorted(chains.buffers)
    for key, buf in chains.buffers.items():
        for name, value in buf.items():
            assert torch.equal(copy.buffers[key][name], value)  # bit-exact: tensors copied
    with pytest.raises(ValueError, match="do not fit this config"):
        PersistentChains(1, 5, fraction=1.0, reset=0.0).load_state_dict(chains.state_dict())


def test_bad_settings_are_refused_by_the_config():
    with pytest.raises(ConfigError, match="train.persistent_levels"):
        load_config(ROOT / "configs/debug.yaml", ["train.persistent_levels=7"])
    with pytest.raises(ConfigError, match="train.persistent_fraction"):
        load_config(ROOT / "configs/debug.yaml", ["train.persistent_fraction=1.5"])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("conditional", [False, True])
def test_training_with_persistent_chains_checkpoints_them_and_resumes_exactly(
    tmp_path: Path, conditional
):
    """0 -> 4 in one go and 0 -> 2 -> 4 resumed: the same losses at steps 3 and 4 only if the chains were
    restored (empty chains would restart instead of continuing)."""
    one_go, split = tmp_path / "one_go", tmp_path / "split"
    extra = (
        ["data.class_conditional=true", "data.uncond_prob=0.0", "train.persistent_size=20"]
        if conditional
        else []
    )
    pcd = [*PCD, *extra]
    assert train_debug(one_go, *pcd) == 0
    records = _metrics(one_go)
    assert max(r["persistent/share"] for r in records) > 0  # continued chains fed the EBM
    assert (one_go / "checkpoint-2" / "persistent_chains_0.safetensors").is_file()
    assert train_debug(split, "--max_train_steps", "2", *pcd) == 0
    assert (
        train_debug(split, "--resume_from_checkpoint", "latest", "--max_train_steps", "4", *pcd)
        == 0
    )
    for a, b in zip(records[2:], _metrics(split)[2:], strict=True):
        for key in ("ebm/loss", "ebm/energy_gap", "persistent/share"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_resume_with_persistent_chains_across_an_epoch_boundary(tmp_path: Path):
    """48 toy points at batch 16 make an epoch of 3 steps: 0 -> 6 in one go against 0 -> 2 -> 6 resumed
    mid-epoch, so the resumed run must restore the chains and the data order past the epoch's end."""
    toy = [
        "data.name=checkerboard",
        "data.toy_size=48",
        "ebm.arch=mlp",
        "initializer.arch=mlp",
        "ebm.hidden=16",
        "initializer.hidden=16",
        "log.sample_every=0",
    ]
    pcd = [*PCD, *toy]
    one_go, split = tmp_path / "one_go", tmp_path / "split"
    assert train_debug(one_go, "--max_train_steps", "6", *pcd) == 0
    assert train_debug(split, "--max_train_steps", "2", *pcd) == 0
    resumed = ["--resume_from_checkpoint", "latest", "--max_train_steps", "6"]
    assert train_debug(split, *resumed, *pcd) == 0
    a, b = _metrics(one_go), _metrics(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert max(r["persistent/share"] for r in a[2:]) > 0  # the chains fed the EBM after the resume
    for x, y in zip(a[2:], b[2:], strict=True):
        for key in ("ebm/loss", "ebm/energy_gap", "persistent/share", "persistent/max_abs"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x["step"], key)
