"""Writing outputs so that a run killed half-way never leaves a file or directory that looks complete."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a killed run never leaves a truncated file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def save_hf_model(model: Any, tokenizer: Any, target: Path, state_dict: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` into a staging directory, then move it into place; ``state_dict``: the weights to write
    instead of the model's own (gathered from a sharded model)."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
