"""One training step: ``train_step`` (one cooperative update of the EBM and the initializer, CDRL
Alg. 1) behind the divergence guard's checks, and the state it updates (``TrainState``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch import Tensor, nn

from cdrl import precision as prec
from cdrl.config import Config
from cdrl.langevin import langevin_refine
from cdrl.losses import ebm_loss, initializer_loss
from cdrl.sampling import Level, energy_fn, frozen, level
from cdrl.schedule import NoiseSchedule
from cdrl.training.persistent import PersistentChains
from cdrl.utils import expand_as


class TrainState(NamedTuple):
    """What ``train_step`` updates: the prepared networks, their optimizers and LR schedulers."""

    ebm: nn.Module  # prepared (possibly DDP-wrapped)
    initializer: nn.Module | None
    ebm_opt: torch.optim.Optimizer
    init_opt: torch.optim.Optimizer | None
    ebm_sched: Any
    init_sched: Any
    # persistent negatives at the lowest levels (train.persistent_*), or None
    chains: PersistentChains | None = None


Models = TrainState  # the name before the move to cdrl.training


class StepResult(NamedTuple):
    stats: dict[str, Tensor]  # detached; complete only for an applied step
    problem: str | None  # why the step was not applied (divergence guard), or None


class MicroBatches:
    """The micro-batches of one optimizer step (``train.gradient_accumulation_steps``): their stats and the
    first problem among them, which spoils the whole step (no update, one bad step for the guard)."""

    def __init__(self) -> None:
        self.stats: list[dict[str, Tensor]] = []
        self.problem: str | None = None

    @property
    def spoiled(self) -> bool:
        """Whether a micro-batch of the current step was refused (the rest need no compute)."""
        return self.problem is not None

    def add(self, result: StepResult, accelerator: Accelerator) -> StepResult | None:
        """Record a micro-batch's result; the optimizer step's, once this micro-batch completed it."""
        self.stats.append(result.stats)
        self.problem = self.problem or result.problem
        if not accelerator.sync_gradients:
            return None
        done = StepResult(merge_stats(self.stats), self.problem)
        self.stats, self.problem = [], None
        return done


def merge_stats(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One optimizer step's stats from its micro-batches' (equal sizes): per-level sums add up, maxima
    (``*/max_abs``) take the largest, everything else is the mean over the micro-batches that have it
    (the gradient norms: only the last one)."""
    if len(parts) == 1:
        return parts[0]
    merged: dict[str, Tensor] = {}
    for key in dict.fromkeys(key for part in parts for key in part):
        values = torch.stack([part[key] for part in parts if key in part])
        if key.startswith("level/"):
            merged[key] = values.sum(0)
        elif key.endswith("/max_abs"):
            merged[key] = values.amax(0)
        else:
            merged[key] = values.mean(0)
    return merged


def lr_schedule(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    """Linear warmup, then constant, cosine or linear decay to 0 at ``total`` (diffusers' ``get_scheduler``)."""
    name = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total, warmup + 1)
    )


def drop_conditions(cond: Tensor, sizes: Sequence[int], prob: float) -> Tensor:
    """Replace each condition by its null token with probability ``prob`` (classifier-free guidance training)."""
    null = torch.tensor(list(sizes), device=cond.device).expand_as(cond)
    drop = torch.rand(cond.shape, device=cond.device) < prob
    return torch.where(drop, null, cond)


def train_step(
    models: TrainState,
    batch: tuple[Tensor, Tensor],
    cfg: Config,
    schedule: NoiseSchedule,
    accelerator: Accelerator,
    condition_sizes: Sequence[int] = (),
) -> StepResult:
    """One cooperative update of the EBM and the initializer (CDRL Alg. 1), unless the guard refuses it.

    Under gradient accumulation (``accelerator.gradient_accumulation_steps`` N > 1) a call is one
    micro-batch inside ``accelerator.accumulate``: its gradients (each loss / N) add to those of the
    cycle, and only the cycle's last micro-batch (``accelerator.sync_gradients``) clips, steps both
    optimizers and both LR schedulers, as in diffusers' training examples; ``MicroBatches`` gathers the
    cycle into one optimizer step. With N = 1 every call is a whole step. Under fp16 loss scaling, an
    EBM update that changes the scale (an overflow, or its growth every 2000 steps) comes before the
    initializer's last backward of the cycle, so that one initializer update mixes two scales.

    The divergence guard applies no update when the energies or either loss are non-finite, when the
    energy gap |mean E(y-) - E(y+)| exceeds ``guard.max_energy_gap``, or when the EBM's gradients are
    non-finite. The initializer's backward runs after the EBM's update (fp16 loss scaling needs one
    update between two unscales), so non-finite initializer gradients after finite losses skip only the
    initializer's update. Under fp16 loss scaling, non-finite gradients are GradScaler's to handle: it
    skips the update and lowers its scale.

    Returns:
        The detached stats, and the reason the step was not applied (None when it was).
    """
    if accelerator.sync_gradients:  # the previous optimizer step is complete: a new cycle starts
        models.ebm_opt.zero_grad(set_to_none=True)
        if models.init_opt is not None:
            models.init_opt.zero_grad(set_to_none=True)
    with accelerator.accumulate(*_networks(models)):
        return _micro_batch(models, batch, cfg, schedule, accelerator, condition_sizes)


def skip_micro_batch(models: TrainState, accelerator: Accelerator) -> StepResult:
    """A micro-batch of an optimizer step that an earlier micro-batch spoiled (the guard refused it): it
    computes nothing and only advances accelerate's accumulation count; the step applies no update."""
    with accelerator.accumulate(*_networks(models)):
        return StepResult({}, None)


def _propose(
    init: nn.Module | None, x_next: Tensor, lvl: Level, cond: Tensor | None
) -> tuple[Tensor | None, Tensor]:
    """The initializer's proposal at levels ``lvl`` from x_{t+1}: (its mean, the mean plus the proposal's
    noise) (CDRL Eq. (8)); without an initializer (DRL), (None, x_{t+1})."""
    if init is None:
        return None, x_next
    mean = init(x_next, lvl.next_noise_level, cond)
    return mean, mean + expand_as(lvl.proposal_std, mean) * torch.randn_like(mean)


def _networks(models: TrainState) -> list[nn.Module]:
    return [net for net in (models.ebm, models.initializer) if net is not None]


def _micro_batch(
    models: TrainState,
    batch: tuple[Tensor, Tensor],
    cfg: Config,
    schedule: NoiseSchedule,
    accelerator: Accelerator,
    condition_sizes: Sequence[int],
) -> StepResult:
    x0, cond = batch
    x0 = x0 * cfg.data.scale
    b, T = x0.shape[0], schedule.num_levels
    cond = drop_conditions(cond, condition_sizes, cfg.data.uncond_prob) if condition_sizes else None

    # Draw a level per example and the pair (x_t, x_{t+1}) from q (CDRL Alg. 1, line 3; App. A.3).
    t = torch.randint(0, T, (b,), device=x0.device)
    x_t, x_next = schedule.q_pair(x0, t, variance_reduction=cfg.train.variance_reduction)
    lvl = level(schedule, t, cfg.langevin)
    scale = expand_as(lvl.scale, x0)
    y_pos = scale * x_t

    # Propose y with the initializer (gradient flows through its mean only) (CDRL Eq. (8)).
    init, ebm = models.initializer, models.ebm
    if init is not None:
        init.train()
    mean, y_init = _propose(init, x_next, lvl, cond)

    # Refine with K Langevin steps under the unwrapped EBM: eval mode, frozen, fp32 state (CDRL Alg. 1, line 5).
    ebm_raw = accelerator.unwrap_model(ebm)
    # bf16: the forwards run under autocast, the chain state and its gradient stay float32. fp16 stays
    # float32: the tempered energy's backward is scaled by 1 / s_0^2 = 4e4 and would overflow.
    langevin_dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None

    top = cfg.train.refine_top
    refined = None if top is None else t >= T - top  # the examples whose own level is a refined one

    def refine(y: Tensor, x_tether: Tensor, t_chain: Tensor, c: Tensor | None) -> Tensor:
        """K Langevin steps from y of the recovery conditionals at levels t_chain, tethered to x_tether
        (with ``train.refine_top``, only at the noisiest levels; the others are returned as they are)."""
        lv = lvl if t_chain is t else level(schedule, t_chain, cfg.langevin)  # the batch: lvl as is
        if top is not None:
            chosen = (t_chain >= T - top).nonzero().squeeze(1)
            out = y.clone()
            if chosen.numel():
                sub = Level(*(field[chosen] for field in lv))
                out[chosen] = chain(
                    y[chosen], x_tether[chosen], sub, None if c is None else c[chosen]
                )
            return out
        return chain(y, x_tether, lv, c)

    def chain(y: Tensor, x_tether: Tensor, lv: Level, c: Tensor | None) -> Tensor:
        with frozen(ebm_raw):
            fn = prec.autocast_energy_fn(energy_fn(ebm_raw, lv, null=c), langevin_dtype)
            return langevin_refine(
                fn,
                y,
                x_tether,
                sigma=lv.sigma,
                tether=lv.tether,
                step_size=lv.step_size,
                n_steps=cfg.langevin.n_steps,
                noise=cfg.langevin.noise,
            )

    if top is not None and cfg.train.ebm_full_batch:
        # Every example trains the EBM: one drawn below the refined levels gets a second level among them
        # (same x_0, fresh noise) and a proposal there; the others keep theirs. One chain refines all.
        t_ebm = torch.where(refined, t, torch.randint_like(t, T - top, T))
        x_t_e, x_next_e = schedule.q_pair(
            x0, t_ebm, variance_reduction=cfg.train.variance_reduction
        )
        rows = refined.view(-1, *[1] * (x0.dim() - 1))
        x_t_e, x_next_e = torch.where(rows, x_t, x_t_e), torch.where(rows, x_next, x_next_e)
        lvl_ebm = level(schedule, t_ebm, cfg.langevin)
        with torch.no_grad():
            _, y_init_e = _propose(init, x_next_e, lvl_ebm, cond)
        y_init_e = torch.where(rows, y_init.detach(), y_init_e)
        y_ebm_neg = chain(y_init_e, x_next_e, lvl_ebm, cond)
        y_neg = torch.where(
            rows, y_ebm_neg, y_init.detach()
        )  # the initializer's own (refined) targets
        y_ebm_pos, continued = expand_as(lvl_ebm.scale, x0) * x_t_e, None
    else:
        lvl_ebm, y_ebm_pos = lvl, y_pos
        y_neg = refine(y_init.detach(), x_next, t, cond)
        # At the lowest levels some of the EBM's negatives continue persistent chains (persistent.py).
        y_ebm_neg, continued = y_neg, None
        if models.chains is not None:
            y_ebm_neg, continued = models.chains.negatives(t, y_neg, x_next, cond, refine)

    # Energies of positives and refined negatives in one forward; both losses (DRL Eq. (8), CDRL Eq. (9)).
    ebm.train()
    both_cond = None if cond is None else torch.cat([cond, cond])
    energies = ebm(
        torch.cat([y_ebm_pos, y_ebm_neg]),
        torch.cat([lvl_ebm.noise_level, lvl_ebm.noise_level]),
        both_cond,
    ).float()
    energy_pos, energy_neg = energies.chunk(2)
    pos, neg, weight = energy_pos, energy_neg, lvl_ebm.loss_weight
    if refined is not None:
        if not cfg.train.ebm_full_batch:
            # With train.refine_top the EBM learns at the refined levels only: below them its negatives
            # would never move toward low energy, so nothing would bound the gap it learns (a digits run
            # diverged within 105 steps). The initializer alone serves those levels.
            pos, neg, weight = pos[refined], neg[refined], weight[refined]
        # the per-level gaps of the diagnostics: 0 at the levels that are not refined
        energy_pos = torch.where(refined, energy_pos, 0.0)
        energy_neg = torch.where(refined, energy_neg, 0.0)
    if pos.numel():
        loss, stats = ebm_loss(pos, neg, weight)
    else:  # no example of a refined level in this batch: nothing for the EBM to learn
        loss = energies.sum() * 0.0
        stats = {k: loss.detach() for k in ("ebm/energy_pos", "ebm/energy_neg", "ebm/energy_gap")}
    stats["ebm/loss"] = loss.detach()
    losses = {"EBM": loss}
    if init is not None:
        # The data term's target: under shared noise only the posterior mean is E[y | x_{t+1}, x_0].
        y_data = y_pos
        if cfg.train.init_data_target == "posterior_mean":
            y_data = scale * schedule.posterior_mean(x0, x_next, t)
        init_loss, init_stats = initializer_loss(
            y_init, y_neg, mean=mean, y_data=y_data, data_weight=cfg.train.init_data_weight
        )
        stats.update(init_stats)
        losses["initializer"] = init_loss

    # Divergence guard: apply nothing on non-finite energies or losses, or an exploded energy gap.
    problem = value_problem(pos, neg, losses, cfg.guard.max_energy_gap, accelerator)
    if problem is not None:
        return StepResult(stats, problem)

    diagnostics = _diagnostics(
        models, x0, t, T, energy_pos, energy_neg, y_neg, y_init, y_pos, y_ebm_neg, continued
    )
    if (
        not accelerator.sync_gradients
    ):  # a micro-batch before the cycle's last: its gradients add up
        accelerator.backward(loss)
        if init is not None:
            accelerator.backward(losses["initializer"])
        return StepResult({**stats, **diagnostics}, None)

    # Update the EBM on positives and refined negatives (DRL Eq. (8)), unless its gradients are non-finite.
    accelerator.backward(loss)
    stats["ebm/grad_norm"] = _as_tensor(
        accelerator.clip_grad_norm_(ebm.parameters(), cfg.train.grad_clip)
    )
    problem = gradient_problem(stats["ebm/grad_norm"], "EBM", accelerator)
    if problem is not None:
        models.ebm_opt.zero_grad(set_to_none=True)
        return StepResult(stats, problem)
    models.ebm_opt.step()
    models.ebm_sched.step()

    # Update the initializer towards the refined samples: cooperative learning (CDRL Eq. (9)).
    if init is not None:
        accelerator.backward(losses["initializer"])
        stats["init/grad_norm"] = _as_tensor(
            accelerator.clip_grad_norm_(init.parameters(), cfg.train.grad_clip)
        )
        problem = gradient_problem(stats["init/grad_norm"], "initializer", accelerator)
        if problem is not None:
            models.init_opt.zero_grad(set_to_none=True)
            return StepResult(stats, f"{problem} (only the EBM's update was applied)")
        models.init_opt.step()
        models.init_sched.step()
    stats.update(diagnostics)
    return StepResult(stats, None)


def _diagnostics(
    models: TrainState,
    x0: Tensor,
    t: Tensor,
    T: int,
    energy_pos: Tensor,
    energy_neg: Tensor,
    y_neg: Tensor,
    y_init: Tensor,
    y_pos: Tensor,
    y_ebm_neg: Tensor,
    continued: Tensor | None,
) -> dict[str, Tensor]:
    """Per-level sums of the energy gap E(y-) - E(y+), of how far Langevin moved and of how far y- is from y+."""
    stats = {}
    with torch.no_grad():
        gap = (energy_neg - energy_pos).detach()
        move = (y_neg - y_init.detach()).flatten(1).norm(dim=1)
        # RMS distance of y- from the true y+.
        err = (y_neg - y_pos).flatten(1).pow(2).mean(dim=1).sqrt()
        stats["level/count"] = torch.zeros(T, device=x0.device).index_add_(
            0, t, torch.ones_like(gap)
        )
        for name, values in (("gap", gap), ("move", move), ("rms_err", err)):
            stats[f"level/{name}"] = torch.zeros(T, device=x0.device).index_add_(0, t, values)
        stats["langevin/move_norm"] = move.mean()
        if models.chains is not None:
            stats["persistent/share"] = continued.float().mean()
            # the largest |y| among the continued chains: chains that run off show up here first
            stats["persistent/max_abs"] = (y_ebm_neg.flatten(1).abs().amax(1) * continued).amax()
    return stats


def value_problem(
    energy_pos: Tensor,
    energy_neg: Tensor,
    losses: dict[str, Tensor],
    max_energy_gap: float,
    accelerator: Accelerator,
) -> str | None:
    """Why a step must not be applied, judged on its energies and losses (agreed by all processes), or None.

    Args:
        energy_pos, energy_neg: (b,) E(y+) and E(y-).
        losses: scalar losses by network name.
        max_energy_gap: bound on |mean E(y-) - E(y+)| (``guard.max_energy_gap``).
        accelerator: reduces the verdict over processes, so that every process skips the same steps.
    """
    gap = (energy_neg - energy_pos).mean()
    checks = {
        "non-finite EBM energies": ~torch.isfinite(torch.cat([energy_pos, energy_neg])).all(),
        **{f"non-finite {name} loss": ~torch.isfinite(value) for name, value in losses.items()},
        f"energy gap beyond guard.max_energy_gap={max_energy_gap:g}": gap.abs() > max_energy_gap,
    }
    bad = torch.stack(list(checks.values())).float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    reasons = [name for name, flag in zip(checks, bad.tolist(), strict=True) if flag > 0]
    if not reasons:
        return None
    values = (
        f"E(y+) mean {energy_pos.mean().item():.4g}, E(y-) mean {energy_neg.mean().item():.4g}, "
        f"gap {gap.item():.4g}"
    )
    return f"{'; '.join(reasons)} ({values})"


def gradient_problem(grad_norm: Tensor, name: str, accelerator: Accelerator) -> str | None:
    """'non-finite EBM gradients (norm nan)' when the gradient norm is not finite, else None.

    Gradients are already reduced over processes, so every process agrees. Under fp16 loss scaling an
    overflow is GradScaler's to handle (it skips the update and lowers the scale): None.
    """
    if accelerator.scaler is not None or bool(torch.isfinite(grad_norm)):
        return None
    return f"non-finite {name} gradients (norm {grad_norm.item():.4g})"


def _as_tensor(value: Any) -> Tensor:
    return value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
