"""Conditioning by composition: classifier-free guidance and products of experts, in one batched forward.

Works for any network ``net(x, noise_level, cond) -> out`` whose output combines linearly: the EBM's energy
(b,) and the initializer's proposal mean (b, ...). With a null condition c_0 and terms (c_k, w_k):

    out = out(c_0) + sum_k w_k (out(c_k) - out(c_0))            (CDRL Sec. 3.4; Liu et al. 2022, Eq. (7))

Classifier-free guidance is the single term (c, guidance_scale): guidance_scale = 1 is the plain
conditional, 0 the unconditional (diffusers' meaning; the paper's w = guidance_scale - 1). Composition of
concepts uses weights 1 + w_k, with a negative weight for NOT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from einops import repeat
from torch import Tensor

Condition = tuple[Tensor, float]  # (cond (b, K) long, weight)
ConditionalNet = Callable[[Tensor, Tensor, Tensor | None], Tensor]


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
