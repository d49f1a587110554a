"""``hydra/sweeper=rows``: Hydra's basic sweeper over a union of rows (found by Hydra's plugin discovery in the
``hydra_plugins`` namespace)."""
