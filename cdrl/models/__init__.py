"""The networks: energy models and initializers, as diffusers models (save_pretrained / from_pretrained),
and ``build_models``, which makes the pair a config describes."""

from cdrl.models.ebm import EnergyMLP, EnergyResNet
from cdrl.models.factory import build_models
from cdrl.models.initializer import InitializerMLP, InitializerUNet

__all__ = ["EnergyMLP", "EnergyResNet", "InitializerMLP", "InitializerUNet", "build_models"]
