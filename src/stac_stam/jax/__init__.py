"""The JAX optimizers: optax transformations ``stac``, ``stam``, ``stam_lite``, and seed 002's ``STAM``/``STAMLite``."""

from stac_stam.jax._common import per_tensor
from stac_stam.jax.stac import PytreePartition, stac, stac_compact, stac_partition, stac_recommended
from stac_stam.jax.stam import STAM, STAMState, scale_by_stam, stam
from stac_stam.jax.stam_lite import STAMLite, STAMLiteState, scale_by_stam_lite, stam_lite

__all__ = ["stac", "stac_recommended", "stac_compact", "stac_partition", "PytreePartition", "stam", "scale_by_stam",
           "STAM", "STAMState", "stam_lite", "scale_by_stam_lite", "STAMLite", "STAMLiteState", "per_tensor"]
