"""Where the JAX STAM and STAMLite lived before ``stac_stam``: kept so that states pickled under these paths load."""
