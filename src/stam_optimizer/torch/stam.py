"""Where the PyTorch ``STAM`` lived before ``stac_stam``: kept so that objects pickled under this path still load."""

from stac_stam.torch.stam import STAM

__all__ = ["STAM"]
