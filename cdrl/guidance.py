"""Conditioning by composition: classifier-free guidance and products of experts, in one batched forward.

Works for any network ``net(x, noise_level, cond) -> out`` whose output combines linearly: the EBM's energy
(b,) and the initializer's proposal mean (b, ...). With a null condition c_0 and terms (c_k, w_k):

    out = out(c_0) + sum_k w_k (out(c_k) - out(c_0))            (CDRL Sec. 3.4; Liu et al. 2022, Eq. (7))

Classifier-free guidance is the single term (c, guidance_scale): guidance_scale = 1 is the plain
conditional, 0 the unconditional (diffusers' meaning; the paper's w = guidance_scale - 1). Composition of
concepts uses weights 1 + w_k, with a negative weight for NOT.

A negative weight in that linear form rewards distance from the negated concept without bound, so strong
negations also push samples off the data. ``negation="posterior"`` (``split_negated``, used by
``cdrl.sampling.energy_fn``) instead adds -|w| log p(not c | y) to the energy, with p(c | y) the EBM's
implicit classifier: a softmax over every value of the negated condition of (-E(y, value) + b_value) /
temperature, where b are per-level offsets fitted on training data (``cdrl.calibration``; recovery
likelihood leaves them free). The term is bounded: it vanishes once c is unlikely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from einops import repeat
from torch import Tensor

Condition = tuple[Tensor, float]  # (cond (b, K) long, weight)
ConditionalNet = Callable[[Tensor, Tensor, Tensor | None], Tensor]
NEGATIONS = ("linear", "posterior")
Negation = Literal["linear", "posterior"]


class Conditioning(NamedTuple):
    """What conditions a sampler, in one typed argument (k-diffusion's ``extra_args``): the null condition,
    the weighted terms composed with it (``composed``), how negative weights act, and, for
    ``negation="posterior"``, the implicit classifier's offsets (one (T, size_k) tensor per condition,
    ``cdrl.calibration.fit_condition_offsets``). ``Conditioning()`` is unconditional."""

    null: Tensor | None = None  # (b, K) long
    terms: Sequence[Condition] = ()
    negation: Negation = "linear"
    offsets: Sequence[Tensor] | None = None


def null_condition(
    sizes: Sequence[int], batch: int, device: torch.device | str | None = None
) -> Tensor:
    """(batch, K) long, every condition at its null token: index ``sizes[k]`` of condition k (one past its
    last class; the label-dropout token of training and the unconditional row of guidance)."""
    return torch.tensor(list(sizes), dtype=torch.long, device=device).expand(batch, -1).clone()


class Negated(NamedTuple):
    """A NOT term for posterior negation: condition ``index`` must not take ``value``."""

    index: int
    value: Tensor  # (b,) long
    weight: float  # |w| > 0
    alternatives: (
        Tensor  # (size, b, K): the null condition with ``index`` set to each of its values
    )


def split_negated(
    terms: Sequence[Condition], null: Tensor | None, negation: str
) -> tuple[tuple[Condition, ...], tuple[Negated, ...]]:
    """Separate the negative-weight terms that ``negation="posterior"`` turns into implicit-classifier NOTs.

    Args:
        terms: (cond (b, K), weight) pairs.
        null: (b, K) null condition; its entries are the conditions' sizes (the null id is the size).
        negation: "linear" (every term stays linear) or "posterior".

    Returns:
        (the terms that stay linear, the negated ones).
    """
    if negation not in NEGATIONS:
        raise ValueError(f"negation must be one of {', '.join(NEGATIONS)}, got {negation!r}")
    if negation == "linear" or not any(weight < 0 for _, weight in terms):
        return tuple(terms), ()
    kept, negated = [], []
    for cond, weight in terms:
        if weight >= 0:
            kept.append((cond, weight))
            continue
        set_ = (cond != null).any(0).nonzero().flatten().tolist()
        if len(set_) != 1:
            raise ValueError(
                "posterior negation needs each negated term to set exactly one condition, "
                f"got {len(set_)}"
            )
        index = set_[0]
        size = int(null[0, index])
        alternatives = null.unsqueeze(0).repeat(size, 1, 1)
        alternatives[:, :, index] = torch.arange(size, device=null.device).unsqueeze(1)
        negated.append(Negated(index, cond[:, index], -float(weight), alternatives))
    return tuple(kept), tuple(negated)


def log_prob_not(neg_energies: Tensor, value: Tensor) -> Tensor:
    """log p(not value | y) = logsumexp_{v != value} l_v - logsumexp_v l_v with l_v = -E_v / temperature.

    Args:
        neg_energies: (b, size) logits l_v = -E(y, v) / temperature.
        value: (b,) the negated value.

    Returns:
        (b,) log-probabilities, <= 0.
    """
    others = neg_energies.scatter(1, value.long().unsqueeze(1), float("-inf"))
    return torch.logsumexp(others, 1) - torch.logsumexp(neg_energies, 1)


def stacked_conditions(
    noise_level: Tensor, *, null: Tensor | None, terms: Sequence[Condition] = ()
) -> tuple[Tensor, Tensor | None]:
    """The (noise level, condition) batch that ``composed`` feeds its network: n copies, null first.

    Returns:
        (n b,) noise levels and (n b, K) conditions (None for an unconditional network), where n is 1
        without terms or for the plain conditional, else 1 + len(terms).
    """
    if null is None:
        if terms:
            raise ValueError("conditions were given to an unconditional model")
        return noise_level, None
    if not terms:
        return noise_level, null
    if len(terms) == 1 and terms[0][1] == 1.0:
        return noise_level, terms[0][0]  # plain conditional: no null pass needed
    n = 1 + len(terms)
    return repeat(noise_level, "b -> (n b)", n=n), torch.cat([null, *(cond for cond, _ in terms)])


def composed(
    net: ConditionalNet,
    x: Tensor,
    noise_level: Tensor,
    *,
    null: Tensor | None,
    terms: Sequence[Condition] = (),
) -> Tensor:
    """Evaluate the composed output out(c_0) + sum_k w_k (out(c_k) - out(c_0)) in one forward pass.

    Args:
        net: the network, net(x, noise_level, cond).
        x: (b, ...) input.
        noise_level: (b,) continuous noise level.
        null: (b, K) null condition, or None for an unconditional network (then ``terms`` must be empty).
        terms: (cond (b, K), weight) pairs.

    Returns:
        The composed output, shaped like ``net``'s.
    """
    levels, conds = stacked_conditions(noise_level, null=null, terms=terms)
    n = levels.shape[0] // x.shape[0] if x.shape[0] else 1
    if n == 1:
        return net(x, levels, conds)
    outs = net(repeat(x, "b ... -> (n b) ...", n=n), levels, conds).chunk(n)
    base = outs[0]
    return base + sum(
        weight * (out - base) for (_, weight), out in zip(terms, outs[1:], strict=True)
    )
