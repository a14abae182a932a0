"""The initializers (amortized samplers): x_{t+1} -> mean of a Gaussian proposal for y = sqrt(alpha_{t+1}) x_t.

Both predict a residual, mu = x_{t+1} + net(x_{t+1}), with a zero-initialized output layer, so an untrained
initializer proposes x_{t+1} itself, DRL's chain start (CDRL Sec. 3.2).
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from cdrl.models.layers import ConditionEmbedding, noise_level_embedding
from cdrl.weights import SafetensorsOnly


class InitializerUNet(SafetensorsOnly, ModelMixin, ConfigMixin):
    """A small U-Net (diffusers' ``UNet2DModel``): GroupNorm, SiLU, dropout, attention at chosen resolutions.

    With the defaults (CIFAR-10: 64 channels, 3 resolutions, attention at 16 and 8) it has about 3.8M
    parameters, the size of CDRL's initializer. Conditions enter through the time embedding.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (64, 64, 64),
        attention_levels: tuple[bool, ...] = (False, True, True),
        layers_per_block: int = 4,
        dropout: float = 0.1,
        norm_num_groups: int = 32,
        attention_head_dim: int = 32,
        condition_sizes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                "attention_levels needs one entry per resolution in block_out_channels"
            )
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=layers_per_block,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
        )
        if condition_sizes:
            self.unet.class_embedding = ConditionEmbedding(
                condition_sizes, block_out_channels[0] * 4
            )
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, x_next: Tensor, noise_level: Tensor, cond: Tensor | None = None) -> Tensor:
        """Proposal mean (b, c, h, w) from x_{t+1} (b, c, h, w) at its noise level (b,), conditions (b, K)."""
        embedding = self.unet.class_embedding
        if embedding is not None and cond is None:
            cond = embedding.null(x_next.shape[0], x_next.device)
        elif embedding is None and cond is not None:
            raise ValueError("this model is unconditional; it takes no condition labels")
        residual = self.unet(x_next, 1000.0 * noise_level, class_labels=cond).sample
        return x_next + residual


class _MLPBlock(nn.Module):
    """GroupNorm -> SiLU -> Linear -> scale/shift from temb -> SiLU -> Linear (zero-init), plus skip."""

    def __init__(self, dim: int, temb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, dim), nn.GroupNorm(groups, dim)
        self.lin1, self.lin2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, 2 * dim))
        nn.init.zeros_(self.lin2.weight)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.lin1(F.silu(self.norm1(x)))
        scale, shift = self.temb_proj(temb).chunk(2, dim=1)
        h = self.lin2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return x + h


class InitializerMLP(SafetensorsOnly, ModelMixin, ConfigMixin):
    """The initializer for vectors (2-D toys), after the official toy example's ``unet_mlp``."""

    @register_to_config
    def __init__(
        self,
        in_features: int = 2,
        hidden: int = 128,
        num_blocks: int = 2,
        temb_dim: int = 128,
        norm_num_groups: int = 32,
        condition_sizes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.temb_dim = temb_dim
        self.temb = nn.Sequential(
            nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        self.cond = ConditionEmbedding(condition_sizes, temb_dim) if condition_sizes else None
        self.lin_in = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(
            [_MLPBlock(hidden, temb_dim, norm_num_groups) for _ in range(num_blocks)]
        )
        self.lin_out = nn.Linear(hidden, in_features, bias=False)
        nn.init.zeros_(self.lin_out.weight)

    def forward(self, x_next: Tensor, noise_level: Tensor, cond: Tensor | None = None) -> Tensor:
        """Proposal mean (b, d) from x_{t+1} (b, d) at noise levels (b,), optional conditions (b, K)."""
        temb = self.temb(noise_level_embedding(noise_level, self.temb_dim))
        if self.cond is not None:
            temb = temb + self.cond(
                cond if cond is not None else self.cond.null(x_next.shape[0], x_next.device)
            )
        elif cond is not None:
            raise ValueError("this model is unconditional; it takes no condition labels")
        h = self.lin_in(x_next)
        for block in self.blocks:
            h = block(h, temb)
        return x_next + self.lin_out(F.silu(h))
