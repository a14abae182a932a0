"""Gradient accumulation (``train.gradient_accumulation_steps``, ``--gradient_accumulation_steps``; issue 18):
N micro-batches of B make the same update as one batch of N*B, and a run counts optimizer steps as
diffusers' training examples do (steps, checkpoints, EMA updates, the LR schedule), resumes at the same
data position, and records the number of micro-batches in its config.yaml.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import reset_accelerate, train_debug
from safetensors.torch import load_file

from cdrl.cli.train import parse_args
from cdrl.config import load_config
from cdrl.models import build_models
from cdrl.pipeline import CDRLScheduler
from cdrl.training import loop
from cdrl.training.step import MicroBatches, TrainState, lr_schedule, train_step

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs/debug.yaml"
N, B = 3, 8
# Deterministic given the draws: no spectral-norm power iteration per forward (its vectors would move once
# per micro-batch), no Langevin noise; a clip so high it never acts (clipping would hide a gradient scale).
EXACT = [
    "train.warmup_steps=0",
    "ebm.spectral_norm=false",
    "langevin.noise=false",
    "train.grad_clip=1e6",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


_RANDINT, _RANDN = torch.randint, torch.randn  # the real ones, for the stand-ins' own buffers


class PerExampleDraws:
    """Stand-ins for torch's random functions whose draws depend only on the call site and the example's
    position in that site's stream, so that N calls on micro-batches of B draw, example by example, what
    one call on N*B draws."""

    def __init__(self) -> None:
        self.cursor: dict[tuple, int] = defaultdict(int)
        self.buffers: dict[tuple, torch.Tensor] = {}

    def _take(self, kind: str, size, make) -> torch.Tensor:
        frame = sys._getframe(2)  # the caller of randint / randn / randn_like
        key = (kind, frame.f_code.co_filename, frame.f_lineno, tuple(size[1:]))
        if key not in self.buffers:
            gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
            self.buffers[key] = make((4096, *size[1:]), gen)
        start = self.cursor[key]
        self.cursor[key] += size[0]
        return self.buffers[key][start : start + size[0]].clone()

    def randint(self, low, high, size, *, device=None, **_):
        out = self._take("randint", size, lambda s, g: _RANDINT(low, high, s, generator=g))
        return out.to(device)

    def randn(self, *size, device=None, dtype=None, **_):
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        out = self._take("randn", size, lambda s, g: _RANDN(s, generator=g))
        return out.to(device=device, dtype=dtype or torch.float32)

    def randn_like(self, x, **_):
        return self._take("randn", x.shape, lambda s, g: _RANDN(s, generator=g)).to(x)


def _train(micro_batches: int, batches: list, monkeypatch) -> tuple[TrainState, list]:
    """train_step on ``batches`` with SGD (a gradient's scale shows in the update) under an Accelerator
    accumulating over ``micro_batches``; returns the models and the step results, the merged one last."""
    reset_accelerate()
    cfg = load_config(DEBUG, EXACT)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=micro_batches)
    torch.manual_seed(0)
    ebm, init = build_models(cfg, (1, 8, 8), ())
    ebm_opt = torch.optim.SGD(ebm.parameters(), lr=0.5)
    init_opt = torch.optim.SGD(init.parameters(), lr=0.5)
    ebm_sched = lr_schedule("constant", ebm_opt, 0, 10)
    init_sched = lr_schedule("constant", init_opt, 0, 10)
    models = TrainState(*accelerator.prepare(ebm, init, ebm_opt, init_opt, ebm_sched, init_sched))
    schedule = CDRLScheduler.from_training_config(cfg).schedule
    draws = PerExampleDraws()
    cycle, results, merged = MicroBatches(), [], None
    with monkeypatch.context() as patch:
        for name in ("randint", "randn", "randn_like"):
            patch.setattr(torch, name, getattr(draws, name))
        for batch in batches:
            results.append(train_step(models, batch, cfg, schedule, accelerator))
            merged = cycle.add(results[-1], accelerator)
    assert merged is not None, "the last micro-batch completes the optimizer step"
    # every draw of the step went through the stand-ins: the level, q's noise, the proposal's noise
    assert sorted(key[0] for key in draws.cursor) == ["randint", "randn", "randn"], draws.cursor
    return models, [*results, merged]


def _params(models: TrainState) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": p.detach().clone()
        for name, net in (("ebm", models.ebm), ("init", models.initializer))
        for key, p in net.named_parameters()
    }


def _grads(models: TrainState) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": p.grad.clone()
        for name, net in (("ebm", models.ebm), ("init", models.initializer))
        for key, p in net.named_parameters()
        if p.grad is not None
    }


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.rand(N * B, 1, 8, 8, generator=gen) * 2 - 1, torch.zeros(
        N * B, 0, dtype=torch.long
    )


def test_n_micro_batches_make_the_update_of_one_batch_n_times_larger(data, monkeypatch):
    x, cond = data
    big, (big_result, _) = _train(1, [(x, cond)], monkeypatch)
    micro = list(zip(x.chunk(N), cond.chunk(N), strict=True))
    acc, results = _train(N, micro, monkeypatch)
    *parts, merged = results
    assert all(problem is None for _, problem in results)

    # The same gradients (each micro-batch's loss / N), hence the same SGD update, in both networks.
    big_grads, acc_grads = _grads(big), _grads(acc)
    assert big_grads.keys() == acc_grads.keys() and len(big_grads) > 10
    torch.testing.assert_close(acc_grads, big_grads, rtol=1e-4, atol=1e-6)
    big_params, acc_params = _params(big), _params(acc)
    torch.testing.assert_close(acc_params, big_params, rtol=1e-4, atol=1e-6)

    # One optimizer step and one LR-schedule step for the N micro-batches; gradient norms once, at the end.
    assert acc.ebm_sched.scheduler.last_epoch == 1 and acc.init_sched.scheduler.last_epoch == 1
    assert ["ebm/grad_norm" in part.stats for part in parts] == [False] * (N - 1) + [True]
    # The step's stats: the means over N*B, the per-level sums over all examples.
    stats = merged.stats
    for key in ("ebm/loss", "ebm/energy_gap", "init/mse", "ebm/grad_norm", "init/grad_norm"):
        torch.testing.assert_close(stats[key], big_result.stats[key], rtol=1e-4, atol=1e-6)
    assert stats["level/count"].sum().item() == N * B
    torch.testing.assert_close(
        stats["level/gap"], big_result.stats["level/gap"], rtol=1e-4, atol=1e-5
    )


def test_the_comparison_can_fail_n_optimizer_steps_are_not_one(data, monkeypatch):
    """Without accumulation the same micro-batches make N updates: measurably not the big batch's one."""
    x, cond = data
    big, _ = _train(1, [(x, cond)], monkeypatch)
    micro = list(zip(x.chunk(N), cond.chunk(N), strict=True))
    steps, _ = _train(1, micro, monkeypatch)
    big_params, step_params = _params(big), _params(steps)
    worst = max((big_params[k] - step_params[k]).abs().max().item() for k in big_params)
    assert worst > 1e-3, worst


def test_the_flag_sets_the_config_key(tmp_path):
    cfg, _ = parse_args(["--config", str(DEBUG), "--gradient_accumulation_steps", "4"])
    assert cfg.train.gradient_accumulation_steps == 4
    cfg, _ = parse_args(["--config", str(DEBUG)])
    assert cfg.train.gradient_accumulation_steps == 1


# ----------------------------------------------------------------------------------------------------------
# A run counts optimizer steps.


def _count_micro_batches(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = loop.train_step

    def counted(models, batch, cfg, schedule, accelerator, condition_sizes=()):
        calls.append(batch[0].shape[0])
        return real(models, batch, cfg, schedule, accelerator, condition_sizes)

    monkeypatch.setattr(loop, "train_step", counted)
    return calls


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_counts_optimizer_steps_checkpoints_ema_and_the_lr_schedule(tmp_path, monkeypatch):
    one = tmp_path / "one"
    assert train_debug(one, "--set", "log.sample_every=0") == 0
    calls = _count_micro_batches(monkeypatch)
    two = tmp_path / "two"
    assert (
        train_debug(two, "--gradient_accumulation_steps", "2", "--set", "log.sample_every=0") == 0
    )
    assert calls == [16] * 8  # debug.yaml: 4 optimizer steps of 2 micro-batches of 16
    records = _metrics(two)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # the LR warmup (2 steps in debug.yaml) counts optimizer steps: the same rates as without accumulation
    assert [r["lr/ebm"] for r in records] == [r["lr/ebm"] for r in _metrics(one)]
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    marker = json.loads((two / "checkpoint-4" / "checkpoint.json").read_text())
    assert marker["ema"]["ebm"]["optimization_step"] == 4
    assert marker["ema"]["init"]["optimization_step"] == 4
    optimizer = torch.load(two / "checkpoint-4" / "optimizer.bin", weights_only=True)
    assert int(optimizer["state"][0]["step"]) == 4
    scheduler = torch.load(two / "checkpoint-4" / "scheduler.bin", weights_only=True)
    assert scheduler["last_epoch"] == 4
    assert (
        yaml.safe_load((two / "config.yaml").read_text())["train"]["gradient_accumulation_steps"]
        == 2
    )


TOY = [
    "data.name=checkerboard",
    "data.toy_size=80",  # 5 batches of 16 per epoch: with 2 micro-batches, the epoch's last step has 1
    "ebm.arch=mlp",
    "initializer.arch=mlp",
    "ebm.hidden=16",
    "initializer.hidden=16",
    "log.sample_every=0",
]


def test_resume_continues_at_the_same_micro_batch_across_a_short_last_cycle(tmp_path, monkeypatch):
    flags = ["--gradient_accumulation_steps", "2", "--max_train_steps", "5"]
    calls = _count_micro_batches(monkeypatch)
    straight = tmp_path / "straight"
    assert train_debug(straight, *flags, "--set", *TOY) == 0
    # steps 1, 2, 3 = micro-batches 1-2, 3-4, 5 (the loader's end syncs), steps 4, 5 = epoch 1
    assert len(calls) == 2 + 2 + 1 + 2 + 2
    split = tmp_path / "split"
    assert train_debug(split, *flags[:2], "--max_train_steps", "2", "--set", *TOY) == 0
    calls.clear()
    resumed = [*flags, "--resume_from_checkpoint", "latest", "--set", *TOY]
    assert train_debug(split, *resumed) == 0
    assert len(calls) == 1 + 2 + 2
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a = load_file(straight / "checkpoint-5" / name)
        b = load_file(split / "checkpoint-5" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_launchers_accumulation_is_honoured_and_the_flag_wins(tmp_path, monkeypatch):
    """ACCELERATE_GRADIENT_ACCUMULATION_STEPS (what `accelerate launch --gradient_accumulation_steps`
    sets under DeepSpeed) is accelerate's default; an explicit --gradient_accumulation_steps wins."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    calls = _count_micro_batches(monkeypatch)
    args = ["--max_train_steps", "1", "--set", "log.sample_every=0", "log.num_grid_samples=1"]
    assert train_debug(tmp_path / "env", *args) == 0
    assert len(calls) == 2
    config = yaml.safe_load((tmp_path / "env" / "config.yaml").read_text())
    assert config["train"]["gradient_accumulation_steps"] == 2
    calls.clear()
    assert train_debug(tmp_path / "flag", "--gradient_accumulation_steps", "3", *args) == 0
    assert len(calls) == 3


# ----------------------------------------------------------------------------------------------------------
# The divergence guard under accumulation: a refused micro-batch spoils its whole optimizer step.


@pytest.mark.parametrize("bad", [0, 1], ids=["first-micro-batch", "last-micro-batch"])
def test_a_refused_micro_batch_spoils_its_step_and_leaves_no_gradient_behind(data, bad):
    from cdrl.training.step import skip_micro_batch

    x, cond = data
    micro = list(zip(x.chunk(2), cond.chunk(2), strict=True))
    cfg = load_config(DEBUG, EXACT)
    schedule = CDRLScheduler.from_training_config(cfg).schedule

    def setup():
        reset_accelerate()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        torch.manual_seed(0)
        ebm, init = build_models(cfg, (1, 8, 8), ())
        opts = [torch.optim.SGD(net.parameters(), lr=0.5) for net in (ebm, init)]
        scheds = [lr_schedule("constant", opt, 0, 10) for opt in opts]
        return accelerator, TrainState(*accelerator.prepare(ebm, init, *opts, *scheds))

    def step(accelerator, models, batches):
        cycle = MicroBatches()
        for batch in batches:
            if cycle.spoiled:
                result = skip_micro_batch(models, accelerator)
            else:
                result = train_step(models, batch, cfg, schedule, accelerator)
            done = cycle.add(result, accelerator)
        return done

    accelerator, models = setup()
    before = _params(models)
    poisoned = list(micro)
    poisoned[bad] = (torch.full_like(micro[bad][0], float("nan")), micro[bad][1])
    stats, problem = step(accelerator, models, poisoned)
    assert problem is not None and "non-finite" in problem
    after = _params(models)
    assert all(torch.equal(before[k], after[k]) for k in before), "a spoiled step moved a parameter"
    assert (
        models.ebm_sched.scheduler.last_epoch == 0 and models.init_sched.scheduler.last_epoch == 0
    )
    # The next step starts from zero gradients: it equals a clean first step on a fresh setup.
    torch.manual_seed(1)
    assert step(accelerator, models, micro).problem is None
    grads = _grads(models)
    accelerator, fresh = setup()
    torch.manual_seed(1)
    assert step(accelerator, fresh, micro).problem is None
    torch.testing.assert_close(grads, _grads(fresh), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_processes_accumulate_without_syncing_and_keep_identical_weights(tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 optimizer steps of 2 micro-batches: DDP reduces only on each
    step's last micro-batch (accelerate's no_sync before it), and both ranks end with the same weights."""
    from test_distributed import DRIVER, _env, _run, _torchrun

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    args = ["--config", DEBUG, "--report_to", "none", "--output_dir", run, "--max_train_steps", "2"]
    args += ["--gradient_accumulation_steps", "2", "--set", "log.sample_every=0"]
    cmd = _torchrun(str(driver), str(tmp_path), *map(str, args))
    proc = _run(cmd, _env(ACCELERATE_USE_CPU="true"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [info["num_processes"] for info in infos] == [2, 2]
    assert [len(info["batches"]) for info in infos] == [4, 4]  # micro-batches per rank
    assert [r["step"] for r in _metrics(run)] == [1, 2]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
    final = load_file(str(run / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(final[k], rank0[f"ebm.{k}"]) for k in final)
