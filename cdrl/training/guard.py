"""The divergence guard across steps: counting refused steps, rolling back to the newest complete
checkpoint with lower learning rates after a streak of them, and refusing to publish a diverging state.
(``train_step`` judges each step: ``cdrl.training.step.value_problem`` / ``gradient_problem``.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from cdrl.config import Config
from cdrl.training.checkpoint import list_checkpoints, load_checkpoint
from cdrl.training.run_dir import log_event, warn
from cdrl.training.state import scale_learning_rates
from cdrl.training.step import TrainState


class DivergenceError(FloatingPointError):
    """Training diverged and the guard could not recover; reported in one line, exit code 2."""


@dataclass
class GuardState:
    """The divergence guard's counters; saved in every checkpoint's checkpoint.json."""

    skipped: int = 0  # bad steps so far (on every trajectory, rollbacks included)
    streak: int = 0  # bad steps in a row, up to the current step
    rollbacks: int = 0  # so far; the learning rates are scaled by guard.lr_factor ** rollbacks

    @classmethod
    def restored(cls, counters: dict[str, int]) -> GuardState:
        """The counters a checkpoint stored; its state was good, so no streak runs on from it."""
        return cls(**{**counters, "streak": 0})


def on_bad_step(
    problem: str,
    step: int,
    guard: GuardState,
    cfg: Config,
    accelerator: Accelerator,
    output_dir: Path,
    models: TrainState,
    ema: dict[str, EMAModel],
) -> int | None:
    """Count and log a skipped step; after ``guard.max_bad_steps`` in a row, roll back.

    A rollback restores the newest complete checkpoint (models, optimizers, EMAs, RNG states) and scales
    both learning rates by ``guard.lr_factor`` once more.

    Returns:
        The step of the checkpoint rolled back to, or None (training goes on).

    Raises:
        DivergenceError: the guard is off, there is no checkpoint yet, or ``guard.max_rollbacks`` rollbacks
            did not help.
    """
    guard.skipped += 1
    guard.streak += 1
    event = {
        "step": step,
        "event": "skipped",
        "reason": problem,
        "guard/skipped": guard.skipped,
        "guard/streak": guard.streak,
    }
    log_event(accelerator, output_dir, event)
    warn(accelerator, f"step {step} skipped ({guard.streak} in a row): {problem}")
    what = f"{guard.streak} bad step{'s' * (guard.streak > 1)} in a row up to step {step} (last: {problem})"
    checkpoints = list_checkpoints(output_dir)
    if not cfg.guard.enabled:
        stop = f"step {step}: {problem}; training stopped (guard.enabled=false)"
    elif guard.streak < cfg.guard.max_bad_steps:
        return None
    elif not checkpoints:
        stop = (
            f"training diverged: {what}, and there is no checkpoint to roll back to yet; lower "
            "train.ebm_lr (or langevin.b2), or save checkpoints more often (log.checkpointing_steps)"
        )
    elif guard.rollbacks >= cfg.guard.max_rollbacks:
        scale = cfg.guard.lr_factor**guard.rollbacks
        stop = (
            f"training diverged: {what}, after {guard.rollbacks} rollback(s) with the learning rates "
            f"scaled by {scale:g}; the last good checkpoint is {checkpoints[-1][1]}; lower train.ebm_lr "
            "(or langevin.b2), or allow more rollbacks (guard.max_rollbacks)"
        )
    else:
        target, path = checkpoints[-1]
        load_checkpoint(accelerator, path, models, ema)
        guard.rollbacks += 1
        guard.streak = 0
        scale_learning_rates(models, cfg, cfg.guard.lr_factor**guard.rollbacks)
        lr = models.ebm_sched.get_last_lr()[0]
        log_event(
            accelerator,
            output_dir,
            {
                "step": step,
                "event": "rollback",
                "to_step": target,
                "checkpoint": path.name,
                "guard/rollbacks": guard.rollbacks,
                "lr/ebm": lr,
            },
        )
        warn(
            accelerator,
            f"{what}: rolled back to {path.name}, learning rates scaled by "
            f"{cfg.guard.lr_factor**guard.rollbacks:g} (rollback {guard.rollbacks} of "
            f"at most {cfg.guard.max_rollbacks})",
        )
        return target
    log_event(accelerator, output_dir, {"step": step, "event": "stopped", "reason": stop})
    raise DivergenceError(stop)


def final_state_problem(guard: GuardState, ema: dict[str, Any], step: int) -> str | None:
    """Why the run's final state must not be exported (None when it may): it ends inside a streak of
    bad steps, or an EMA weight is not finite. The same answer on every process (their states agree)."""
    if guard.streak:
        return f"{guard.streak} bad step{'s' * (guard.streak > 1)} in a row up to step {step}"
    for name, model in ema.items():
        if any(not torch.isfinite(p).all() for p in model.shadow_params):
            return f"non-finite weights in the {name} EMA at step {step}"
    return None


def check_final_state(guard: GuardState, ema: dict[str, Any], step: int, output_dir: Path) -> None:
    """Never publish a diverging state: a run that ends inside a streak of bad steps, or with non-finite
    EMA weights, writes no final checkpoint and leaves pipeline/ as it was.

    Raises:
        DivergenceError: naming the problem and the last good checkpoint.
    """
    problem = final_state_problem(guard, ema, step)
    if problem is None:
        return
    good = list_checkpoints(output_dir)
    where = f"the last good checkpoint is {good[-1][1]}" if good else "there is no checkpoint"
    raise DivergenceError(
        f"training ended with {problem}: nothing was exported ({output_dir / 'pipeline'} is "
        f"as it was); {where}: resume from it with a lower --learning_rate"
    )
