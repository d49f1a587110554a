"""A check of the checkpoint to resume from, before any model is loaded: a bad one fails in seconds, naming the key."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from qtuning.errors import QTuningError


def check_checkpoint(path: str) -> None:
    """Raise `QTuningError` naming ``resume`` unless ``path`` is a Lightning checkpoint that training can resume.

    The file is loaded as `train` has Lightning load it (``weights_only``: plain containers and tensors, no code),
    memory-mapped so that a large checkpoint costs little here.
    """
    if not Path(path).is_file():
        raise QTuningError(f"resume={path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # what torch.save writes; a cut-off copy has lost its zip directory at the end
        raise QTuningError(f"resume={path}: not a checkpoint (not a torch.save zip archive; truncated or another file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a damaged archive fails in many ways: unpickling, zip records, storages
        reason = f"{type(err).__name__}: {str(err).strip()}".splitlines()[0].split(". ")[0]  # torch's run long
        raise QTuningError(f"resume={path}: cannot load it as a checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise QTuningError(f"resume={path}: not a Lightning checkpoint (no 'state_dict')")
    if "optimizer_states" not in checkpoint:
        raise QTuningError(f"resume={path}: holds weights only (save_weights_only); training cannot resume from it")
