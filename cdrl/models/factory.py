"""The networks a config describes: the EBM and the initializer (None for DRL) for a data shape."""

from __future__ import annotations

from torch import nn

from cdrl.config import Config
from cdrl.models.ebm import EnergyMLP, EnergyResNet
from cdrl.models.initializer import InitializerMLP, InitializerUNet
from cdrl.utils import ConfigError


def build_models(
    cfg: Config, sample_shape: tuple[int, ...], condition_sizes: tuple[int, ...]
) -> tuple[nn.Module, nn.Module | None]:
    """The EBM and the initializer (None for DRL) for data of ``sample_shape``.

    Vector data (``sample_shape`` of length 1) takes the MLPs, images the ResNet EBM and the U-Net.

    Raises:
        ConfigError: an architecture that does not fit the data, or an image size the networks'
            downsampling does not divide.
    """
    e, i = cfg.ebm, cfg.initializer
    conds = tuple(condition_sizes)
    if len(sample_shape) == 1:
        if e.arch != "mlp" or i.arch not in ("mlp", "none"):
            raise ConfigError("vector data needs ebm.arch=mlp and initializer.arch=mlp (or none)")
        ebm = EnergyMLP(
            in_features=sample_shape[0],
            hidden=e.hidden,
            channel_mult=tuple(e.channel_mult),
            num_res_blocks=e.num_res_blocks,
            spectral_norm=e.spectral_norm,
            condition_sizes=conds,
        )
        init = (
            None
            if i.arch == "none"
            else InitializerMLP(
                in_features=sample_shape[0],
                hidden=i.hidden,
                num_blocks=i.num_blocks,
                norm_num_groups=min(i.norm_num_groups, i.hidden),
                condition_sizes=conds,
            )
        )
        return ebm, init
    if e.arch != "resnet" or i.arch not in ("unet", "none"):
        raise ConfigError("image data needs ebm.arch=resnet and initializer.arch=unet (or none)")
    channels, size = sample_shape[0], sample_shape[1]
    if size % 2 ** (len(e.channel_mult) - 1) or size % 2 ** (len(i.block_out_channels) - 1):
        raise ConfigError(
            f"image size {size} is not divisible by the networks' downsampling; change channel_mult"
        )
    ebm = EnergyResNet(
        in_channels=channels,
        sample_size=size,
        base_channels=e.base_channels,
        channel_mult=tuple(e.channel_mult),
        num_res_blocks=e.num_res_blocks,
        spectral_norm=e.spectral_norm,
        condition_sizes=conds,
    )
    init = (
        None
        if i.arch == "none"
        else InitializerUNet(
            in_channels=channels,
            sample_size=size,
            block_out_channels=tuple(i.block_out_channels),
            attention_levels=tuple(i.attention_levels),
            layers_per_block=i.layers_per_block,
            dropout=i.dropout,
            norm_num_groups=i.norm_num_groups,
            attention_head_dim=i.attention_head_dim,
            condition_sizes=conds,
        )
    )
    return ebm, init
