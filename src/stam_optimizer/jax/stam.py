"""Where the JAX ``STAM`` lived before ``stac_stam``: kept so that objects pickled under this path still load."""

from stac_stam.jax.stam import STAM, STAMState

__all__ = ["STAM", "STAMState"]
