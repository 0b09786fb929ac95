"""The PyTorch optimizers: ``from stac_stam.torch import STAC, STAM, STAMLite``."""

from stac_stam.torch.stac import STAC
from stac_stam.torch.stam import STAM
from stac_stam.torch.stam_lite import STAMLite

__all__ = ["STAC", "STAM", "STAMLite"]
