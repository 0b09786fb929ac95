"""Where the JAX blocks' shared state lived before ``stac_stam``: kept so that states pickled under this path load."""

from stac_stam.jax._common import SkipNonfiniteState

__all__ = ["SkipNonfiniteState"]
