"""What training feeds its losses and what it exports: the EBM's positives and loss weights, the
initializer's regression target, label dropout (cdrl.training.step: train_step, drop_conditions), and the
EMA weights in the exported pipeline (cdrl.training.loop.run).

The train_step tests spy on the functions train_step calls (``NoiseSchedule.q_pair``,
and the names ``ebm_loss``, ``initializer_loss``, ``langevin_refine`` in ``cdrl.training.step``) and on the
networks' forwards, and recompute every quantity from the schedule's alphas, not from its derived
properties.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from conftest import DEBUG_CONFIG, reset_accelerate, train_debug
from diffusers.optimization import get_constant_schedule_with_warmup
from safetensors.torch import load_file

import cdrl.training.step as train_module
from cdrl.config import ConfigError, load_config
from cdrl.models import build_models
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.sampling import level
from cdrl.schedule import NoiseSchedule
from cdrl.training.step import Models, drop_conditions, train_step

BATCH = 16


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


# ----------------------------------------------------------------------------------------------------------
# One spied train_step.


def _spied_step(monkeypatch, overrides=(), condition_sizes=(), labels=None):
    """One train_step on a random digits-shaped batch with every input of its losses recorded.

    Returns (seen, schedule, cfg): ``seen`` holds the q_pair draw, the Langevin chain's arguments and
    result, the networks' forward inputs and outputs, and the loss functions' arguments.
    """
    seen: dict = {}
    real_pair = NoiseSchedule.q_pair
    real_ebm_loss, real_init_loss = train_module.ebm_loss, train_module.initializer_loss
    real_refine = train_module.langevin_refine

    def spy_pair(self, x0, t, **kwargs):
        x_t, x_next = real_pair(self, x0, t, **kwargs)
        seen.setdefault("pairs", []).append((t.clone(), x_t.clone(), x_next.clone()))
        if "t" not in seen:  # the batch's own draw (train.ebm_full_batch draws a second one)
            seen["x0"], seen["t"] = x0.clone(), t.clone()
            seen["x_t"], seen["x_next"] = x_t.clone(), x_next.clone()
        return x_t, x_next

    def spy_refine(energy_fn, y, x_next, **kwargs):
        out = real_refine(energy_fn, y, x_next, **kwargs)
        seen.setdefault("refine", []).append(
            {"y": y.clone(), "x_next": x_next, **kwargs, "out": out}
        )
        return out

    def spy_ebm_loss(energy_pos, energy_neg, weight):
        seen["ebm_loss"] = (
            energy_pos.detach().clone(),
            energy_neg.detach().clone(),
            weight.clone(),
        )
        return real_ebm_loss(energy_pos, energy_neg, weight)

    def spy_init_loss(proposal, y_neg, **kwargs):
        seen["init_loss"] = {"proposal": proposal, "y_neg": y_neg, **kwargs}
        return real_init_loss(proposal, y_neg, **kwargs)

    monkeypatch.setattr(NoiseSchedule, "q_pair", spy_pair)
    monkeypatch.setattr(train_module, "langevin_refine", spy_refine)
    monkeypatch.setattr(train_module, "ebm_loss", spy_ebm_loss)
    monkeypatch.setattr(train_module, "initializer_loss", spy_init_loss)

    # warmup 0: with warmup the first step runs at lr 0 (diffusers' warmup starts at 0).
    cfg = load_config(DEBUG_CONFIG, ["train.warmup_steps=0", *overrides])
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    ebm, init = build_models(cfg, (1, 8, 8), condition_sizes)
    ebm_opt = torch.optim.Adam(ebm.parameters(), lr=cfg.train.ebm_lr)
    init_opt = torch.optim.AdamW(init.parameters(), lr=cfg.train.init_lr, weight_decay=0.0)
    scheds = [get_constant_schedule_with_warmup(opt, 0) for opt in (ebm_opt, init_opt)]
    models = Models(*accelerator.prepare(ebm, init, ebm_opt, init_opt, *scheds))

    # The EBM's own forward runs once, on [y+; y-] (the Langevin chain calls context/energy instead).
    def record(name):
        def hook(module, args, output):
            inputs = [None if a is None else a.clone() for a in args]
            seen.setdefault(name, []).append((inputs, output.detach().clone()))

        return hook

    models.ebm.register_forward_hook(record("ebm_forward"))
    models.initializer.register_forward_hook(record("init_forward"))

    schedule = CDRLScheduler.from_training_config(cfg).schedule
    x0 = torch.rand(BATCH, 1, 8, 8) * 2 - 1
    cond = torch.zeros(BATCH, 0, dtype=torch.long) if labels is None else labels
    stats, problem = train_step(models, (x0, cond), cfg, schedule, accelerator, condition_sizes)
    assert problem is None, problem
    seen["stats"] = stats
    return seen, schedule, cfg


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.float().view(-1, 1, 1, 1)


def test_train_step_feeds_the_ebm_its_positives_and_weights_and_the_initializer_its_target(
    monkeypatch,
):
    seen, schedule, cfg = _spied_step(monkeypatch)
    t, x_t, x_next = seen["t"], seen["x_t"], seen["x_next"]
    T = schedule.num_levels
    assert len(set(t.tolist())) > 1  # several levels in the batch, so a per-level mix-up shows

    # From the alphas alone: y = sqrt(alpha_{t+1}) x_t, scale 1 at the top level (a marginal EBM,
    # docs/method.md §3); w_t = sigma_1 / sigma_{t+1} with sigma_i = sqrt(1 - alpha_i) (docs/method.md §5.4).
    ab = schedule.alphas_cumprod
    alpha = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    scale = torch.where(t == T - 1, torch.ones_like(alpha[t + 1]), alpha[t + 1].sqrt())
    weight = (1 - alpha[1]).sqrt() / (1 - alpha[t + 1]).sqrt()

    # The initializer proposes from x_{t+1} at level t+1's noise input.
    ((init_args, mean),) = seen["init_forward"]
    torch.testing.assert_close(init_args[0], x_next, rtol=0, atol=0)
    torch.testing.assert_close(init_args[1], schedule.noise_levels[t + 1].float())

    # One Langevin chain, from the proposal, tethered to x_{t+1} with sigma_{t+1} (tether 0 at the top).
    (chain,) = seen["refine"]
    torch.testing.assert_close(chain["x_next"], x_next, rtol=0, atol=0)
    torch.testing.assert_close(chain["sigma"], (1 - alpha[t + 1]).sqrt().float())
    torch.testing.assert_close(chain["tether"], (t < T - 1).float())
    assert chain["n_steps"] == cfg.langevin.n_steps

    # The EBM's loss forward sees [y+; y-] at level t's noise input: y+ from x_t, y- the chain's output.
    ((ebm_args, energies),) = seen["ebm_forward"]
    y_pos, y_neg = ebm_args[0].chunk(2)
    torch.testing.assert_close(y_pos, _per_sample(scale) * x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_neg, chain["out"], rtol=0, atol=0)
    torch.testing.assert_close(ebm_args[1], schedule.noise_levels[t].float().repeat(2))

    # ebm_loss gets E(y+), E(y-) from that forward and w_t per example.
    energy_pos, energy_neg, loss_weight = seen["ebm_loss"]
    torch.testing.assert_close(energy_pos, energies[:BATCH], rtol=0, atol=0)
    torch.testing.assert_close(energy_neg, energies[BATCH:], rtol=0, atol=0)
    torch.testing.assert_close(loss_weight, weight.float())
    assert not torch.allclose(loss_weight, torch.ones_like(loss_weight))
    expected_loss = (weight.float() * (energy_pos - energy_neg)).mean()
    torch.testing.assert_close(seen["stats"]["ebm/loss"], expected_loss)

    # The initializer regresses its proposal (the chain's start, differentiable through its mean)
    # onto the refined negative y- (cooperative learning, CDRL Eq. (9)); no data term by default.
    init_loss = seen["init_loss"]
    torch.testing.assert_close(init_loss["y_neg"], chain["out"], rtol=0, atol=0)
    torch.testing.assert_close(init_loss["proposal"].detach(), chain["y"], rtol=0, atol=0)
    assert init_loss["proposal"].requires_grad
    assert init_loss["data_weight"] == 0.0
    assert not torch.allclose(chain["out"], chain["y"], atol=1e-4)  # Langevin moved the proposal

    # proposal = mean + std * eps, std = sqrt(alpha_{t+1} betatilde_{t+1}) (scale 1 at the top level):
    # over 16 x 64 pixels the mean square of the standardized residual is 1 within 5 standard
    # errors (a chi-square mean over n = 1024 draws has standard error sqrt(2 / n) = 0.044).
    betatilde = (1 - ab[t]) / (1 - ab[t + 1]) * (1 - alpha[t + 1])
    std = (scale * betatilde.sqrt()).float()
    z = (chain["y"] - mean) / _per_sample(std)
    assert abs(z.pow(2).mean().item() - 1) < 5 * (2 / z.numel()) ** 0.5


def test_train_refine_top_trains_the_ebm_at_the_noisiest_levels_only(monkeypatch):
    """train.refine_top N: one chain over the examples of the N noisiest levels, and the EBM's loss on
    those examples alone; every other negative is the initializer's proposal itself."""
    overrides = ["train.refine_top=2", "langevin.refine_top=2", "langevin.tweedie=false"]
    seen, schedule, cfg = _spied_step(monkeypatch, overrides=overrides)
    t, T = seen["t"], schedule.num_levels
    top = t >= T - 2
    assert top.any() and (~top).any()  # both kinds in the batch
    (chain,) = seen["refine"]
    assert chain["y"].shape[0] == int(top.sum())
    ((ebm_args, energies),) = seen["ebm_forward"]
    _, y_neg = ebm_args[0].chunk(2)
    proposal = seen["init_loss"]["proposal"].detach()
    torch.testing.assert_close(y_neg[~top], proposal[~top], rtol=0, atol=0)
    torch.testing.assert_close(y_neg[top], chain["out"], rtol=0, atol=0)
    torch.testing.assert_close(chain["y"], proposal[top], rtol=0, atol=0)
    torch.testing.assert_close(chain["tether"], (t[top] < T - 1).float())
    torch.testing.assert_close(seen["init_loss"]["y_neg"], y_neg, rtol=0, atol=0)
    energy_pos, energy_neg, weight = seen["ebm_loss"]
    torch.testing.assert_close(energy_pos, energies[:BATCH][top], rtol=0, atol=0)
    torch.testing.assert_close(energy_neg, energies[BATCH:][top], rtol=0, atol=0)
    assert weight.shape[0] == int(top.sum())


def test_train_ebm_full_batch_trains_the_ebm_on_every_example(monkeypatch):
    """train.ebm_full_batch: an example drawn below the N refined levels gets a second level among them
    (the same x_0, its own noise) for the EBM, the others keep theirs; one chain refines the whole batch,
    the EBM learns on all of it, and the initializer's targets are as without the option."""
    overrides = ["train.refine_top=2", "langevin.refine_top=2", "langevin.tweedie=false"]
    seen, schedule, cfg = _spied_step(
        monkeypatch, overrides=[*overrides, "train.ebm_full_batch=true"]
    )
    t, T = seen["t"], schedule.num_levels
    top = t >= T - 2
    assert top.any() and (~top).any()  # both kinds in the batch
    (_, first_x_t, first_next), (t2, second_x_t, second_next) = seen["pairs"]
    assert bool((t2 >= T - 2).all())
    t_ebm = torch.where(top, t, t2)
    rows = top.view(-1, 1, 1, 1)

    (chain,) = seen["refine"]
    assert chain["y"].shape[0] == BATCH
    torch.testing.assert_close(chain["tether"], (t_ebm < T - 1).float())
    torch.testing.assert_close(chain["x_next"], torch.where(rows, first_next, second_next))
    proposal = seen["init_loss"]["proposal"].detach()
    torch.testing.assert_close(chain["y"][top], proposal[top], rtol=0, atol=0)
    # the second proposal: the initializer at the second level, from the second pair's x_{t+1}
    (_, _), (second_init, _) = seen["init_forward"]
    torch.testing.assert_close(second_init[0][~top], second_next[~top])
    torch.testing.assert_close(second_init[1], schedule.noise_levels[t_ebm + 1].float())

    ((ebm_args, energies),) = seen["ebm_forward"]
    y_pos, y_neg = ebm_args[0].chunk(2)
    torch.testing.assert_close(ebm_args[1], schedule.noise_levels[t_ebm].float().repeat(2))
    scale = level(schedule, t_ebm, cfg.langevin).scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(y_pos, scale * torch.where(rows, first_x_t, second_x_t))
    torch.testing.assert_close(y_neg, chain["out"], rtol=0, atol=0)
    energy_pos, energy_neg, weight = seen["ebm_loss"]
    torch.testing.assert_close(energy_pos, energies[:BATCH], rtol=0, atol=0)
    torch.testing.assert_close(energy_neg, energies[BATCH:], rtol=0, atol=0)
    assert weight.shape[0] == BATCH

    # the initializer regresses onto the refined negative at its own refined levels, its proposal below
    target = seen["init_loss"]["y_neg"]
    torch.testing.assert_close(target[top], chain["out"][top], rtol=0, atol=0)
    torch.testing.assert_close(target[~top], proposal[~top], rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.ebm_full_batch=true"],
        [
            "train.ebm_full_batch=true",
            "train.refine_top=2",
            "langevin.refine_top=2",
            "langevin.tweedie=false",
            "train.persistent_levels=1",
        ],
    ],
)
def test_ebm_full_batch_needs_refine_top_and_no_persistent_chains(overrides):
    with pytest.raises(ConfigError, match="train.ebm_full_batch needs train.refine_top"):
        load_config(DEBUG_CONFIG, overrides)


# ----------------------------------------------------------------------------------------------------------
# Label dropout.

SIZES = (10, 2, 3)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_drop_conditions_is_exact_at_zero_and_one(prob):
    gen = torch.Generator().manual_seed(0)
    cond = torch.stack([torch.randint(0, s, (500,), generator=gen) for s in SIZES], 1)
    out = drop_conditions(cond, SIZES, prob)
    assert out.shape == cond.shape and out.dtype == cond.dtype
    expected = cond if prob == 0.0 else torch.tensor(SIZES).expand_as(cond)
    assert torch.equal(out, expected)


def test_drop_conditions_replaces_each_condition_with_its_null_token_at_the_rate():
    n, prob = 40_000, 0.1
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cond = torch.stack([torch.randint(0, s, (n,), generator=gen) for s in SIZES], 1)
    out = drop_conditions(cond, SIZES, prob)
    assert out.shape == (n, len(SIZES)) and out.dtype == cond.dtype
    changed = out != cond
    for k, size in enumerate(SIZES):
        dropped = out[:, k] == size
        # every change is to the null token (= the condition's size), and a null entry was dropped
        assert torch.equal(changed[:, k], dropped), k
        # The dropped count is Binomial(n, 0.1): mean 4000, standard deviation sqrt(n p (1 - p)) = 60.
        # 5 standard deviations (300) is a margin a correct sampler crosses once in 1.7 million runs.
        count = int(dropped.sum())
        assert abs(count - n * prob) < 5 * (n * prob * (1 - prob)) ** 0.5, (k, count)


@pytest.mark.parametrize("prob", [0.0, 1.0, 0.37])
def test_train_step_drops_labels_with_data_uncond_prob(monkeypatch, prob):
    """Both networks see the labels after dropout with ``data.uncond_prob``, the same ones."""
    seen_probs = []
    real_drop = train_module.drop_conditions

    def spy_drop(cond, sizes, p):
        seen_probs.append((tuple(sizes), p))
        return real_drop(cond, sizes, p)

    monkeypatch.setattr(train_module, "drop_conditions", spy_drop)
    labels = torch.arange(BATCH)[:, None] % 10
    seen, _, _ = _spied_step(
        monkeypatch,
        ["data.class_conditional=true", f"data.uncond_prob={prob}"],
        condition_sizes=(10,),
        labels=labels,
    )
    assert seen_probs == [((10,), prob)]
    ((init_args, _),) = seen["init_forward"]
    ((ebm_args, _),) = seen["ebm_forward"]
    cond = init_args[2]
    torch.testing.assert_close(ebm_args[2], torch.cat([cond, cond]), rtol=0, atol=0)
    if prob == 0.0:
        assert torch.equal(cond, labels)
    elif prob == 1.0:
        assert torch.equal(cond, torch.full_like(labels, 10))
    else:  # some dropped, the rest kept (16 labels at p = 0.37, fixed seed)
        dropped = cond == 10
        assert 0 < int(dropped.sum()) < BATCH
        assert torch.equal(cond[~dropped], labels[~dropped])


# ----------------------------------------------------------------------------------------------------------
# The export holds the EMA weights.


def test_exported_pipeline_holds_the_ema_weights_not_the_live_ones(tmp_path: Path):
    # A short decay and a large learning rate make the EMA clearly differ from the live weights after
    # three steps: diffusers' EMA decay is min(decay, (1 + n) / (10 + n)), 0.25 at the third update, so
    # the EMA lags the live weights by about a quarter of the last Adam step (~lr = 1e-3 per weight).
    out = tmp_path / "run"
    overrides = [
        "train.ema_decay=0.5",
        "train.ema_warmup=false",
        "train.warmup_steps=0",
        "train.ebm_lr=1e-3",
        "train.init_lr=1e-3",
        "log.sample_every=0",
    ]
    assert train_debug(out, "--max_train_steps", "3", "--set", *overrides) == 0
    checkpoint = out / "checkpoint-3"
    ema = load_file(str(checkpoint / "ema.safetensors"))
    info = json.loads((checkpoint / "checkpoint.json").read_text())["ema"]
    assert info["ebm"]["decay"] == 0.5 and info["ebm"]["optimization_step"] == 3

    pipe = CDRLPipeline.from_pretrained(out / "pipeline")
    live = {"ebm": "model.safetensors", "init": "model_1.safetensors"}
    for name, network in (("ebm", pipe.ebm), ("init", pipe.initializer)):
        live_weights = load_file(str(checkpoint / live[name]))
        params = list(network.named_parameters())
        assert len(params) == sum(key.startswith(f"{name}.") for key in ema)
        largest_gap = 0.0
        for index, (key, param) in enumerate(params):
            # exported == EMA shadow, bit for bit (copied, then saved and loaded as float32)
            assert torch.equal(param.detach(), ema[f"{name}.{index}"]), (name, key)
            largest_gap = max(largest_gap, (param.detach() - live_weights[key]).abs().max().item())
        assert largest_gap > 1e-4, (name, largest_gap)
