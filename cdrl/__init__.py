"""cdrl: energy-based generative models trained by cooperative diffusion recovery likelihood (CDRL, DRL)."""

from cdrl.config import Config, load_config
from cdrl.guidance import Conditioning
from cdrl.langevin import langevin_refine
from cdrl.models import EnergyMLP, EnergyResNet, InitializerMLP, InitializerUNet
from cdrl.pipeline import CDRLPipeline, CDRLScheduler
from cdrl.sampling import sample
from cdrl.schedule import NoiseSchedule, cdrl_schedule, drl_schedule, make_schedule

__all__ = [
    "CDRLPipeline",
    "CDRLScheduler",
    "Conditioning",
    "Config",
    "EnergyMLP",
    "EnergyResNet",
    "InitializerMLP",
    "InitializerUNet",
    "NoiseSchedule",
    "cdrl_schedule",
    "drl_schedule",
    "langevin_refine",
    "load_config",
    "make_schedule",
    "sample",
]
__version__ = "0.1.0"
