"""Experiments built on the library, each a module run from the repository's root (``python -m
experiments.noisy_sft all``), with what only they need: corrupting data (`corrupt`) and held-out metrics
(`heldout`). The library never imports them; they are not part of the installed package."""
