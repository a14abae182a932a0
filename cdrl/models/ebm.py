"""The energy-based models: DRL's spectral-normed ResNet for images and its MLP twin for 2-D data.

Sign convention, stated once for the whole package: ``forward`` returns an **energy** E(y, t, c), lower is
likelier. The papers' f_theta is -E. One network serves every noise level through the continuous noise level.

Everything that depends on the noise level and the condition only (the time embedding, each block's shift
and the head's vector) is the *context*: ``forward(y, u, c) == energy(y, context(u, c))``. A Langevin chain
keeps u and c fixed, so it computes the context once and calls ``energy`` at every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from cdrl.models.layers import ConditionEmbedding, noise_level_embedding
from cdrl.weights import SafetensorsOnly


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, negative_slope=0.2)


def _sn(module: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(module) if enabled else module


class _ResBlock(nn.Module):
    """h = conv1(lrelu(x)) + lrelu(Linear(lrelu(temb))); h = conv2(lrelu(h)) * g; out = h + shortcut(x) (DRL App. B)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, *, sn: bool, conv: bool) -> None:
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if conv else nn.Linear
        self.conv1 = _sn(layer(in_ch, out_ch), sn)
        self.conv2 = _sn(layer(out_ch, out_ch), sn)
        self.temb_proj = _sn(nn.Linear(temb_dim, out_ch), sn)
        self.gain = nn.Parameter(torch.ones(out_ch))
        self.shortcut = _sn(layer(in_ch, out_ch), sn) if in_ch != out_ch else nn.Identity()
        self.conv = conv

    def shift(self, temb: Tensor) -> Tensor:
        """The block's additive time/condition term lrelu(Linear(lrelu(temb))): it does not depend on x."""
        t = _lrelu(self.temb_proj(_lrelu(temb)))
        return rearrange(t, "b c -> b c 1 1") if self.conv else t

    def forward(self, x: Tensor, shift: Tensor) -> Tensor:
        h = self.conv1(_lrelu(x))
        gain = rearrange(self.gain, "c -> c 1 1") if self.conv else self.gain
        h = self.conv2(_lrelu(h + shift)) * gain
        return h + self.shortcut(x)


class _TimeEmbedding(nn.Module):
    """sinusoid(temb_dim) -> Linear(4 temb_dim) -> lrelu -> Linear(4 temb_dim), plus condition embeddings."""

    def __init__(self, temb_dim: int, condition_sizes: tuple[int, ...], *, sn: bool) -> None:
        super().__init__()
        self.temb_dim = temb_dim
        self.map1 = _sn(nn.Linear(temb_dim, 4 * temb_dim), sn)
        self.map2 = _sn(nn.Linear(4 * temb_dim, 4 * temb_dim), sn)
        self.cond = ConditionEmbedding(condition_sizes, 4 * temb_dim) if condition_sizes else None

    def forward(self, noise_level: Tensor, cond: Tensor | None) -> Tensor:
        temb = self.map2(_lrelu(self.map1(noise_level_embedding(noise_level, self.temb_dim))))
        if self.cond is not None:
            if cond is None:
                cond = self.cond.null(noise_level.shape[0], noise_level.device)
            temb = temb + self.cond(cond)
        elif cond is not None:
            raise ValueError("this model is unconditional; it takes no condition labels")
        return temb


class EnergyResNet(SafetensorsOnly, ModelMixin, ConfigMixin):
    """DRL's EBM: a spectral-normed ResNet without normalization, attention or dropout (DRL App. B.1).

    3x3 conv to ``base_channels``; per resolution ``num_res_blocks`` residual blocks with
    ``base_channels * channel_mult[i]`` channels; 2x2 average pooling between resolutions; ReLU, sum over
    space, and an inner product with Linear(lrelu(temb)) (no bias, no spectral norm). With the defaults
    (CIFAR-10 32x32) it has about 34.8M parameters.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 32,
        base_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 8,
        spectral_norm: bool = True,
        condition_sizes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        temb_dim = base_channels
        self.embed = _TimeEmbedding(temb_dim, tuple(condition_sizes), sn=spectral_norm)
        self.conv_in = _sn(nn.Conv2d(in_channels, base_channels, 3, padding=1), spectral_norm)
        blocks, pools, ch = [], [], base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(
                    _ResBlock(ch, base_channels * mult, 4 * temb_dim, sn=spectral_norm, conv=True)
                )
                ch = base_channels * mult
            pools.append(level != len(channel_mult) - 1)
        self.blocks = nn.ModuleList(blocks)
        self._pool_after = [
            (i + 1) % num_res_blocks == 0 and pools[i // num_res_blocks] for i in range(len(blocks))
        ]
        self.head = nn.Linear(4 * temb_dim, ch, bias=False)

    def forward(self, y: Tensor, noise_level: Tensor, cond: Tensor | None = None) -> Tensor:
        """Energy of y (b, c, h, w) at continuous noise levels (b,), optional conditions (b, K) -> (b,)."""
        return self.energy(y, self.context(noise_level, cond))

    def context(self, noise_level: Tensor, cond: Tensor | None = None) -> tuple[Tensor, ...]:
        """The y-independent part: each block's shift, then the head's vector Linear(lrelu(temb))."""
        temb = self.embed(noise_level, cond)
        return (*(block.shift(temb) for block in self.blocks), self.head(_lrelu(temb)))

    def energy(self, y: Tensor, context: tuple[Tensor, ...]) -> Tensor:
        """Energy of y (b, c, h, w) given ``context(noise_level, cond)`` for the same batch -> (b,)."""
        *shifts, head = context
        h = self.conv_in(y)
        for block, shift, pool in zip(self.blocks, shifts, self._pool_after, strict=True):
            h = block(h, shift)
            if pool:
                h = F.avg_pool2d(h, 2)
        h = F.relu(h).sum(dim=(2, 3))  # (b, c)
        f = (h * head).sum(dim=1)
        return -f


class EnergyMLP(SafetensorsOnly, ModelMixin, ConfigMixin):
    """The same EBM for vectors (2-D toys): linear residual blocks, spectral norm, a final dense layer."""

    @register_to_config
    def __init__(
        self,
        in_features: int = 2,
        hidden: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 1,
        spectral_norm: bool = True,
        condition_sizes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.embed = _TimeEmbedding(hidden, tuple(condition_sizes), sn=spectral_norm)
        self.lin_in = _sn(nn.Linear(in_features, hidden), spectral_norm)
        blocks, ch = [], hidden
        for mult in channel_mult:
            for _ in range(num_res_blocks):
                blocks.append(
                    _ResBlock(ch, hidden * mult, 4 * hidden, sn=spectral_norm, conv=False)
                )
                ch = hidden * mult
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(ch, 1, bias=False)

    def forward(self, y: Tensor, noise_level: Tensor, cond: Tensor | None = None) -> Tensor:
        """Energy of y (b, d) at noise levels (b,), optional conditions (b, K) -> (b,)."""
        return self.energy(y, self.context(noise_level, cond))

    def context(self, noise_level: Tensor, cond: Tensor | None = None) -> tuple[Tensor, ...]:
        """The y-independent part: each block's shift."""
        temb = self.embed(noise_level, cond)
        return tuple(block.shift(temb) for block in self.blocks)

    def energy(self, y: Tensor, context: tuple[Tensor, ...]) -> Tensor:
        """Energy of y (b, d) given ``context(noise_level, cond)`` for the same batch -> (b,)."""
        h = self.lin_in(y)
        for block, shift in zip(self.blocks, context, strict=True):
            h = block(h, shift)
        return -self.head(F.relu(h)).squeeze(1)
