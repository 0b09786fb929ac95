"""Where the partition classes lived before ``stac_stam``: kept so that objects pickled under this path still load."""

from stac_stam.partition import LayerGroup, STACPartition, partition_trainable_layers

__all__ = ["LayerGroup", "STACPartition", "partition_trainable_layers"]
