"""STAM and STAMLite for PyTorch under the seed's package name: ``from stam_optimizer.torch import STAM, STAMLite``."""

from stac_stam.torch.stam import STAM
from stac_stam.torch.stam_lite import STAMLite

__all__ = ["STAM", "STAMLite"]
