"""STAM: Stable Training with Adaptive Momentum (and its cheaper approximation STAMLite).

JAX: ``from stam_optimizer import STAM, STAMLite`` (the seed's API) or the optax
transformations ``stam`` / ``stam_lite``. PyTorch: ``from stam_optimizer.torch import STAM, STAMLite``.
The JAX names are imported on first use, so ``stam_optimizer.torch`` works without jax.
"""

import importlib

_JAX_EXPORTS = {
    "STAM": "stam_optimizer.jax.stam",
    "stam": "stam_optimizer.jax.stam",
    "STAMState": "stam_optimizer.jax.stam",
    "STAMLite": "stam_optimizer.jax.stam_lite",
    "stam_lite": "stam_optimizer.jax.stam_lite",
    "STAMLiteState": "stam_optimizer.jax.stam_lite",
    "per_tensor": "stam_optimizer.jax._common",
}

__all__ = list(_JAX_EXPORTS)


def __getattr__(name):
    if name in _JAX_EXPORTS:
        return getattr(importlib.import_module(_JAX_EXPORTS[name]), name)
    raise AttributeError(f"module 'stam_optimizer' has no attribute {name!r}")
