"""STAC: SignSGD Trunk, AdamW Cap, under the seeds' package name (the implementation is ``stac_stam``).

PyTorch: ``from stac_optimizer import STAC``. JAX/optax: ``from stac_optimizer.optax import stac``.
The PyTorch names are imported on first use, so ``stac_optimizer.optax`` works without torch.
"""

import importlib

_TORCH_EXPORTS = {
    "STAC": "stac_stam.torch.stac",
    "LayerGroup": "stac_stam.partition",
    "STACPartition": "stac_stam.partition",
    "partition_trainable_layers": "stac_stam.partition",
}

__all__ = list(_TORCH_EXPORTS)


def __getattr__(name):
    if name in _TORCH_EXPORTS:
        return getattr(importlib.import_module(_TORCH_EXPORTS[name]), name)
    raise AttributeError(f"module 'stac_optimizer' has no attribute {name!r}")
