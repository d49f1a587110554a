"""The repository's scripts: run them from its root as modules (``python -m scripts.bench_step``), or as files once
the package is installed (``make setup`` installs it editable)."""
