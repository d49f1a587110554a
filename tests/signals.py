"""A callback that signals its own process at a given step: a cluster's preemption or a crash, on cue, in a test."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    """Sends ``signal_name`` (``SIGKILL``, ``SIGTERM``, ``SIGUSR1``) to this process once ``global_step`` reaches
    ``step``, at the end of that batch (before that step's own checkpoint: callbacks run before ModelCheckpoint)."""

    def __init__(self, step: int, signal_name: str) -> None:
        self.step = step
        self.signum = getattr(signal, signal_name)
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
