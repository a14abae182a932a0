"""The networks: energy models and initializers, as diffusers models (save_pretrained / from_pretrained)."""

from cdrl.models.ebm import EnergyMLP, EnergyResNet
from cdrl.models.initializer import InitializerMLP, InitializerUNet

__all__ = ["EnergyMLP", "EnergyResNet", "InitializerMLP", "InitializerUNet"]
