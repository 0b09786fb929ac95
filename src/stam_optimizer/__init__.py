"""STAM and STAMLite under the seed's package name (the implementation is ``stac_stam``).

JAX: ``from stam_optimizer import STAM, STAMLite`` (the seed's API) or the optax
transformations ``stam`` / ``stam_lite``. PyTorch: ``from stam_optimizer.torch import STAM, STAMLite``.
The JAX names are imported on first use, so ``stam_optimizer.torch`` works without jax.
"""

import importlib

_JAX_EXPORTS = {
    "STAM": "stac_stam.jax.stam",
    "stam": "stac_stam.jax.stam",
    "STAMState": "stac_stam.jax.stam",
    "STAMLite": "stac_stam.jax.stam_lite",
    "stam_lite": "stac_stam.jax.stam_lite",
    "STAMLiteState": "stac_stam.jax.stam_lite",
    "per_tensor": "stac_stam.jax._common",
}

__all__ = list(_JAX_EXPORTS)


def __getattr__(name):
    if name in _JAX_EXPORTS:
        return getattr(importlib.import_module(_JAX_EXPORTS[name]), name)
    raise AttributeError(f"module 'stam_optimizer' has no attribute {name!r}")
