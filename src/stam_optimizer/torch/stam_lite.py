"""Where the PyTorch ``STAMLite`` lived before ``stac_stam``: kept so that objects pickled under this path load."""

from stac_stam.torch.stam_lite import STAMLite

__all__ = ["STAMLite"]
