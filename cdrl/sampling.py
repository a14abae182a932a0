"""The reverse chain over noise levels: proposal, Langevin refinement, next level; then one Tweedie step.

Plain functions of tensors and networks; they do not know how the networks were trained. Inpainting is the
same chain with a known-pixel constraint; guidance and composition enter through ``null`` and ``terms``
(see ``cdrl.guidance``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from cdrl.config import LangevinConfig
from cdrl.guidance import (
    Condition,
    Conditioning,
    composed,
    log_prob_not,
    split_negated,
    stacked_conditions,
)
from cdrl.langevin import EnergyFn, langevin_refine
from cdrl.schedule import NoiseSchedule
from cdrl.utils import expand_as, randn_like


class Level(NamedTuple):
    """Per-sample constants of the recovery step x_{t+1} -> x_t, each (b,) float32 on t's device."""

    noise_level: Tensor  # u'_t, the EBM's noise input
    next_noise_level: Tensor  # u'_{t+1}, the initializer's noise input
    scale: Tensor  # y = scale * x_t (sqrt(alpha_{t+1}); 1 at the top level)
    sigma: Tensor  # sigma_{t+1}
    tether: Tensor  # 1, or 0 at the top level
    step_size: Tensor  # Langevin s_t
    temperature: Tensor  # the EBM output is divided by this: s_t^2 when tempered, else 1
    proposal_std: Tensor  # std of the initializer's proposal in y-space
    loss_weight: Tensor  # w_t = sigma_1 / sigma_{t+1}


def level(schedule: NoiseSchedule, t: Tensor, settings: LangevinConfig) -> Level:
    """The constants of levels ``t`` (b,) long, for the given Langevin settings."""
    base = schedule.langevin_step_sizes(settings.b2)
    steps = base * settings.step_scale  # step_scale moves the step only, not the target density
    temperature = base**2 if settings.tempered else torch.ones_like(base)
    per_level = {
        "noise_level": schedule.noise_levels[:-1],
        "next_noise_level": schedule.noise_levels[1:],
        "scale": schedule.y_scales,
        "sigma": schedule.sigmas[1:],
        "tether": schedule.has_tether,
        "step_size": steps,
        "temperature": temperature,
        "proposal_std": schedule.proposal_stds,
        "loss_weight": schedule.loss_weights,
    }
    return Level(**{k: v.to(t.device)[t].float() for k, v in per_level.items()})


def energy_fn(
    ebm: nn.Module,
    lvl: Level,
    *,
    null: Tensor | None = None,
    terms: Sequence[Condition] = (),
    negation: str = "linear",
    offsets: Sequence[Tensor] | None = None,
) -> EnergyFn:
    """The tempered, composed EBM energy at one level: y -> E(y) / temperature, (b,).

    For an EBM with a ``context`` method (ours), the y-independent context of the stacked conditions is
    computed on the first call and reused by every later call (a Langevin chain), so keep the returned
    function within one ``frozen`` block and one level. With ``negation="posterior"`` each negative-weight
    term adds -|w| log p(not c | y) (``cdrl.guidance.split_negated``) instead of its linear term; the
    implicit classifier's logits are (-E(y, v) + ``offsets[k][v]``) / temperature, with ``offsets`` this
    level's calibrated energy offsets, one (size_k,) tensor per condition (``cdrl.calibration``).
    """
    kept, negated = split_negated(terms, null, negation)
    base = linear_energy_fn(ebm, lvl, null=null, terms=kept)
    if not negated:
        return base
    if offsets is None:
        raise ValueError(
            "negation='posterior' needs the condition offsets fitted on training data, and this model "
            "has none; run `cdrl-calibrate --checkpoint DIR` (train.py stores them for conditional models)"
        )
    alternatives = [
        [linear_energy_fn(ebm, lvl, null=cond) for cond in term.alternatives] for term in negated
    ]

    def fn(y: Tensor) -> Tensor:
        out = base(y)
        for term, fns in zip(negated, alternatives, strict=True):
            logits = torch.stack([-f(y) for f in fns], 1)  # (b, size): -E(y, v) / temperature
            # offsets are energies: -(E(y, v) - offset_v) / temperature
            logits = logits + offsets[term.index].to(logits) / lvl.temperature[:, None]
            out = out - term.weight * log_prob_not(logits, term.value)
        return out

    return fn


def linear_energy_fn(
    ebm: nn.Module, lvl: Level, *, null: Tensor | None, terms: Sequence[Condition] = ()
) -> EnergyFn:
    """``energy_fn`` with every term linear (no posterior negation)."""
    if not hasattr(ebm, "context"):

        def fn(y: Tensor) -> Tensor:
            return composed(ebm, y, lvl.noise_level, null=null, terms=terms) / lvl.temperature

        return fn

    levels, conds = stacked_conditions(lvl.noise_level, null=null, terms=terms)
    cache: list[tuple[Tensor, ...]] = []

    def with_context(y: Tensor, noise_level: Tensor, cond: Tensor | None) -> Tensor:
        if not cache:
            cache.append(ebm.context(levels, conds))
        return ebm.energy(y, cache[0])

    def cached_fn(y: Tensor) -> Tensor:
        return composed(with_context, y, lvl.noise_level, null=null, terms=terms) / lvl.temperature

    return cached_fn


def _at_level(condition_offsets: Sequence[Tensor] | None, t: int) -> list[Tensor] | None:
    """Level t's row of each condition's (T, size) offsets."""
    return None if condition_offsets is None else [offsets[t] for offsets in condition_offsets]


def propose(
    initializer: nn.Module | None,
    x_next: Tensor,
    lvl: Level,
    *,
    null: Tensor | None = None,
    terms: Sequence[Condition] = (),
    generator: torch.Generator | list[torch.Generator] | None = None,
    negation: str = "linear",
    clip: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The initializer's proposal yhat = mu(x_{t+1}) + std * eps in y-space (CDRL Eq. (8)).

    Without an initializer (DRL) the chain starts at x_{t+1} itself. With ``negation="posterior"`` the
    negated terms are left out of the mean (a mean has no posterior to negate): the EBM enforces them.
    ``clip`` maps the mean before the noise is added (``clip_proposal_mean``).
    """
    if initializer is None:
        return x_next.clone()
    terms, _ = split_negated(terms, null, negation)
    mean = composed(initializer, x_next, lvl.next_noise_level, null=null, terms=terms)
    if clip is not None:
        mean = clip(mean)
    return mean + expand_as(lvl.proposal_std, mean) * randn_like(mean, generator)


def clip_proposal_mean(
    schedule: NoiseSchedule, t: int, mean: Tensor, x_next: Tensor, scale: Tensor, limit: float
) -> Tensor:
    """The proposal mean (y-space) with the x_0 it implies clamped to [-limit, limit]: diffusers'
    ``clip_sample`` for a recovery step.

    The mean is read as the DDPM posterior mean sqrt(alpha_{t+1}) mu~(x0_hat, x_{t+1}) (or mu~ itself at
    the top level, ``scale`` 1), solved for x0_hat, clamped, and formed again (``NoiseSchedule.posterior_mean``
    is linear in x_0). ``scale``: the level's y-scale, broadcast like ``mean``.
    """
    levels = torch.full((x_next.shape[0],), t, dtype=torch.long, device=x_next.device)
    offset = schedule.posterior_mean(torch.zeros_like(x_next), x_next, levels)
    slope = schedule.posterior_mean(torch.ones_like(x_next), x_next, levels) - offset
    x0_hat = ((mean / scale - offset) / slope).clamp(-limit, limit)
    return scale * (offset + slope * x0_hat)


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode, no parameter gradients, and cached parametrizations (spectral norm) for sampling."""
    modules = [m for m in modules if m is not None]
    modes = {sub: sub.training for m in modules for sub in m.modules()}
    flags = {param: param.requires_grad for m in modules for param in m.parameters()}
    for module in modules:
        module.eval().requires_grad_(False)
    try:
        with parametrize.cached():
            yield
    finally:
        for sub, training in modes.items():
            sub.training = training
        for param, flag in flags.items():
            param.requires_grad_(flag)


def refine(
    fn: EnergyFn,
    y: Tensor,
    x_next: Tensor,
    lvl: Level,
    *,
    n_steps: int,
    noise: bool = True,
    noise_scale: float = 1.0,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """``n_steps`` Langevin steps from ``y`` on the recovery conditional of level ``lvl`` tethered to
    ``x_next``, under the energy ``fn`` (CDRL Alg. 1, line 5; Alg. 2): the one place a ``Level`` is
    unpacked into ``langevin_refine``."""
    return langevin_refine(
        fn,
        y,
        x_next,
        sigma=lvl.sigma,
        tether=lvl.tether,
        step_size=lvl.step_size,
        n_steps=n_steps,
        noise=noise,
        noise_scale=noise_scale,
        known=known,
        known_mask=known_mask,
        generator=generator,
        callback=callback,
    )


def langevin_steps(settings: LangevinConfig, t: int, num_levels: int) -> int:
    """K at level t: ``n_steps``, or 0 below the ``refine_top`` noisiest levels when that is set."""
    top = settings.refine_top
    return settings.n_steps if top is None or t >= num_levels - top else 0


def total_langevin_steps(settings: LangevinConfig, num_levels: int) -> int:
    """Langevin steps of one sample's walk down all ``num_levels`` levels (``langevin_steps`` summed)."""
    return sum(langevin_steps(settings, t, num_levels) for t in range(num_levels))


def reverse_step(
    ebm: nn.Module,
    initializer: nn.Module | None,
    schedule: NoiseSchedule,
    x_next: Tensor,
    t: int,
    settings: LangevinConfig,
    *,
    cond: Conditioning | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """One recovery step x_{t+1} -> x_t: proposal, K Langevin steps on p(y | x_{t+1}), y / scale (CDRL Alg. 2).

    Args:
        known, known_mask: optional clean observation (b, ...) and its mask (1 = known pixel); the known
            pixels are set to the observation diffused to level t (in y-space) after the proposal and after
            every Langevin step, so only the unknown pixels move.
        cond: see ``sample``.

    Returns:
        (b, ...) x_t.
    """
    null, terms, negation, condition_offsets = cond or Conditioning()
    lvl = level(schedule, torch.full((x_next.shape[0],), t, device=x_next.device), settings)
    scale = expand_as(lvl.scale, x_next)
    known_y = None
    if known is not None:
        t_batch = torch.full((known.shape[0],), t, device=known.device)
        known_y = scale * schedule.q_sample(known, t_batch, randn_like(known, generator))
    clip = None
    if settings.clip_sample:
        clip = functools.partial(
            clip_proposal_mean,
            schedule,
            t,
            x_next=x_next,
            scale=scale,
            limit=settings.clip_sample_range,
        )
    with torch.no_grad():
        y = propose(
            initializer,
            x_next,
            lvl,
            null=null,
            terms=terms,
            generator=generator,
            negation=negation,
            clip=clip,
        )
    fn = energy_fn(
        ebm, lvl, null=null, terms=terms, negation=negation, offsets=_at_level(condition_offsets, t)
    )
    y = refine(
        fn,
        y,
        x_next,
        lvl,
        n_steps=langevin_steps(settings, t, schedule.num_levels),
        noise=settings.noise,
        noise_scale=settings.noise_scale,
        known=known_y,
        known_mask=known_mask,
        generator=generator,
        callback=callback,
    )
    return y / scale


def tweedie_denoise(
    ebm: nn.Module,
    schedule: NoiseSchedule,
    x0: Tensor,
    settings: LangevinConfig,
    *,
    cond: Conditioning | None = None,
) -> Tensor:
    """x0_hat = (x_0 + (1 - alphabar_0) grad log p(x_0)) / sqrt(alphabar_0) (CDRL App. A.2, Tweedie's formula).

    The score is -grad_x E(scale_0 x) / s~^2 with s~ the level-0 step size at b^2 = ``tweedie_b2``, under
    the conditioning ``cond`` (see ``sample``).
    """
    null, terms, negation, condition_offsets = cond or Conditioning()
    t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    tweedie_settings = LangevinConfig(**{**vars(settings), "b2": settings.tweedie_b2})
    lvl = level(schedule, t, tweedie_settings)
    fn = energy_fn(
        ebm, lvl, null=null, terms=terms, negation=negation, offsets=_at_level(condition_offsets, 0)
    )
    with torch.enable_grad():
        leaf = x0.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf * expand_as(lvl.scale, leaf)).sum(), leaf)
    ab0 = float(schedule.alphas_cumprod[0])
    return ((x0 - (1.0 - ab0) * grad) / ab0**0.5).detach()


def sample(
    ebm: nn.Module,
    initializer: nn.Module | None,
    schedule: NoiseSchedule,
    x_top: Tensor,
    settings: LangevinConfig,
    *,
    cond: Conditioning | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    known: Tensor | None = None,
    known_mask: Tensor | None = None,
    resample: int = 0,
    callback: Callable[[int, int, Tensor], None] | None = None,
) -> Tensor:
    """Generate x_0 from x_T: T recovery steps from the top, then the Tweedie step (CDRL Alg. 2).

    Args:
        ebm, initializer: the networks (the initializer may be None: DRL).
        schedule: the noise schedule.
        x_top: (b, ...) x_T, usually N(0, I).
        settings: Langevin settings (n_steps, b2, step_scale, tempered, noise, tweedie, tweedie_b2).
        cond: the conditioning (``cdrl.guidance.Conditioning``: null, terms, negation, offsets); None:
            unconditional. Negative-weight terms act "linear"ly or as a "posterior" NOT (``energy_fn``).
        generator: a generator or one per sample.
        known, known_mask: inpainting constraint (see ``reverse_step``); the output keeps known pixels exactly.
        resample: extra passes per level (RePaint's resampling with jump length 1, Lugmayr et al. 2022): after
            a recovery step x_{t+1} -> x_t, x_t is diffused back by one step, x_{t+1} = sqrt(alpha_{t+1}) x_t
            + sigma_{t+1} eps, and the step is run again, ``resample`` times. It lets the unknown pixels
            harmonize with the known ones; it costs (1 + resample) times the network evaluations.
        callback: called as callback(t, k, y) after Langevin step k at level t.

    Returns:
        (b, ...) samples in data units (not clamped).
    """
    if resample < 0:
        raise ValueError(f"resample must be >= 0, got {resample}")
    x = x_top
    with frozen(ebm, initializer):
        for t in reversed(range(schedule.num_levels)):
            step_callback = None if callback is None else (lambda k, y, t=t: callback(t, k, y))
            x_next = x
            for r in range(resample + 1):
                if r > 0:  # diffuse x_t back to x_{t+1} with q(x_{t+1} | x_t)
                    alpha = float(schedule.alphas[t + 1])
                    x_next = alpha**0.5 * x + (1.0 - alpha) ** 0.5 * randn_like(x, generator)
                x = reverse_step(
                    ebm,
                    initializer,
                    schedule,
                    x_next,
                    t,
                    settings,
                    cond=cond,
                    generator=generator,
                    known=known,
                    known_mask=known_mask,
                    callback=step_callback,
                )
        if settings.tweedie:
            x = tweedie_denoise(ebm, schedule, x, settings, cond=cond)
    if known is not None:
        x = known_mask * known + (1.0 - known_mask) * x
    return x
