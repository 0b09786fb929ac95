"""Where the JAX ``STAMLite`` lived before ``stac_stam``: kept so that objects pickled under this path still load."""

from stac_stam.jax.stam_lite import STAMLite, STAMLiteState

__all__ = ["STAMLite", "STAMLiteState"]
