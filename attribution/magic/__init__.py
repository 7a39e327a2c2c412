"""MAGIC: exact influence on a query's bits/dim through metagradients of a deterministic weighted training run."""
