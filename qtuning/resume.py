"""Runs that survive: which checkpoint to resume from and whether it can be resumed, and a checkpoint on preemption or
repeated non-finite losses.

What a checkpoint carries (Lightning plus ours): model (the adapter alone under LoRA), optimizer, LR scheduler, the
policy's state (a `Callback`'s `state_dict`), the loader's position in the epoch (`qtuning.data.sampling`), and the
global RNG states (`SFTModule.on_save_checkpoint`). Lightning writes it through a temporary file, so a run killed
while writing never leaves a complete-looking partial file.
"""

from __future__ import annotations

import logging
import signal
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qtuning.errors import QTuningError

log = logging.getLogger(__name__)

LAST = "last.ckpt"
SHARDED_META = "meta.pt"  # Lightning's name for a sharded checkpoint's non-tensor part


def check_checkpoint(path: str) -> None:
    """Raise `QTuningError` naming ``resume`` unless ``path`` is a Lightning checkpoint that training can resume.

    The file is loaded as `train` has Lightning load it (``weights_only``: plain containers and tensors, no code),
    memory-mapped so that a large checkpoint costs little here.
    """
    if Path(path).is_dir():
        check_sharded_checkpoint(Path(path))
        return
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


def check_sharded_checkpoint(path: Path) -> None:
    """A sharded checkpoint (``trainer=fsdp2``) is a directory: torch distributed checkpoint's ``.metadata`` and
    shards, with the model and optimizer states, and Lightning's ``meta.pt`` with the rest."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / SHARDED_META).is_file() or not (path / ".metadata").is_file():
        raise QTuningError(f"resume={path}: a directory, but not a sharded checkpoint (no {SHARDED_META}, .metadata)")
    try:
        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        checkpoint_meta(path)
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).strip()}".splitlines()[0].split(". ")[0]
        raise QTuningError(f"resume={path}: cannot load it as a sharded checkpoint ({reason})") from None
    if not any(key.startswith("optimizer_") for key in keys):
        raise QTuningError(f"resume={path}: holds weights only; training cannot resume from it")


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """What a checkpoint holds besides the weights and optimizer states (step, loops, callbacks' states): the whole
    file, or a sharded checkpoint's ``meta.pt``."""
    path = Path(path)
    return torch.load(path / SHARDED_META if path.is_dir() else path, map_location="cpu", weights_only=True)


class NonFiniteLossError(QTuningError):
    """Too many steps in a row with a non-finite loss (``max_bad_steps``)."""


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> str | None:
    """The checkpoint to resume from: ``auto`` → ``checkpoint_dir/last.ckpt`` if it exists (else a fresh start), a
    path → that checkpoint (which must exist), None → a fresh start."""
    if resume is None:
        return None
    if resume == "auto":
        last = checkpoint_dir / LAST
        if last.exists():  # a file, or a directory of shards
            log.info("resume=auto: continuing from %s", last)
            return str(last)
        log.info("resume=auto: no %s yet, starting from scratch", last)
        return None
    if not Path(resume).exists():
        raise QTuningError(f"resume={resume}: no such checkpoint (resume=auto picks {checkpoint_dir / LAST})")
    return resume


class SaveOnInterrupt(Callback):
    """Writes ``last.ckpt`` when the run is preempted or gives up, so that ``resume=auto`` continues from there.

    SIGTERM (a cluster preemption): Lightning finishes the batch under way and stops with `SIGTERMException`; SIGUSR1
    does the same here, unless a SLURM auto-requeue handler already owns it. A `NonFiniteLossError` also saves (the
    weights are those of the last finite step). The run then exits without a traceback (status 0 for a signal).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self._previous_sigusr1: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous_sigusr1 = signal.getsignal(signal.SIGUSR1)
        if self._previous_sigusr1 in (signal.SIG_DFL, signal.SIG_IGN, None):

            def stop_like_sigterm(signum: int, frame: Any) -> None:
                trainer._signal_connector.received_sigterm = True

            signal.signal(signal.SIGUSR1, stop_like_sigterm)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, NonFiniteLossError)):
            path = self.dirpath / LAST
            trainer.save_checkpoint(path)
            log.warning("%s: saved %s at step %d; resume with resume=auto", type(exception).__name__, path,
                        trainer.global_step)  # fmt: skip
