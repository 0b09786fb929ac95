"""stac-stam: memory-lean, stable optimizers for PyTorch and JAX.

The implementation, on the framework axis:

- ``stac_stam.torch``: ``STAC``, ``STAM``, ``STAMLite`` as ``torch.optim.Optimizer`` classes
  (``stac.py``, ``stam.py``, ``stam_lite.py``; their shared base ``_base.py`` and kernels).
- ``stac_stam.jax``: ``stac``, ``stam``, ``stam_lite`` as optax transformations, and seed 002's
  ``STAM``/``STAMLite`` classes (``stac.py``, ``stam.py``, ``stam_lite.py``; shared blocks ``_common.py``).
- ``stac_stam.partition``, ``stac_stam.learning_rates``: what both frameworks' STAC share.

The seed-named packages ``stac_optimizer`` and ``stam_optimizer`` re-export these with the seeds' API.
A torch module never imports jax, and a jax module never imports torch.
"""
