"""STAM and STAMLite for PyTorch: ``from stam_optimizer.torch import STAM, STAMLite``."""

from stam_optimizer.torch.stam import STAM
from stam_optimizer.torch.stam_lite import STAMLite

__all__ = ["STAM", "STAMLite"]
