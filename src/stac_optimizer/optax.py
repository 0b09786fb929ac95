"""STAC for JAX/optax under the seeds' package name: ``from stac_optimizer.optax import stac, stac_partition``."""

from stac_stam.jax.stac import (FactoredState, PytreePartition, SignMomentumState, SNRSignState, scale_by_adam,
                                scale_by_factored, scale_by_sign_momentum, scale_by_snr_sign, stac, stac_compact,
                                stac_partition, stac_recommended)

__all__ = ["stac", "stac_recommended", "stac_compact", "stac_partition", "PytreePartition", "scale_by_sign_momentum",
           "scale_by_snr_sign", "scale_by_factored", "scale_by_adam", "SignMomentumState", "SNRSignState",
           "FactoredState"]
