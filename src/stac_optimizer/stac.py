"""Where ``STAC`` lived before ``stac_stam``: kept so that objects pickled under this path still load."""

from stac_stam.torch.stac import STAC

__all__ = ["STAC"]
