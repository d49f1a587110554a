"""A plain progress line every N optimizer steps when stdout is not a terminal (a batch job, output redirected to a
file), where a progress bar writes only carriage returns and a log would show nothing until the end."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any

import lightning as L

log = logging.getLogger("qtuning.progress")


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def progress_line(
    step: int, total: int | None, loss: float | None, tokens_per_s: float | None, elapsed: float, steps_done: int
) -> str:
    """``step 20/300 (7%) | loss 1.8361 | 5,210 tokens/s | elapsed 0:01:02 | ETA 0:14:28``: the ETA at the pace of the
    ``steps_done`` steps in ``elapsed`` seconds; the parts that are not known are left out."""
    parts = [f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tokens/s")
    parts.append(f"elapsed {clock(elapsed)}")
    if total:
        parts.append(f"ETA {clock(elapsed / steps_done * max(0, total - step))}")
    return " | ".join(parts)


class ProgressLog(L.Callback):
    """Logs `progress_line` every ``every_n_steps`` optimizer steps and at the last, through `logging` (so into the
    redirected output and train.log); silent when stdout is a terminal, where the progress bar shows the same."""

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be at least 1")
        self.every_n_steps = every_n_steps
        self._started = 0.0
        self._first_step = 0  # the step training (re)started at: elapsed time and pace count from there
        self._last_logged = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._first_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, total = trainer.global_step, getattr(pl_module, "total_steps", None)
        due = step % self.every_n_steps == 0 or step == total
        # under gradient accumulation several micro-batches end at the same optimizer step: one line for it
        if (
            not due
            or step in (self._last_logged, self._first_step)
            or not trainer.is_global_zero
            or sys.stdout.isatty()
        ):
            return
        self._last_logged = step
        metrics = trainer.callback_metrics
        loss, tokens_per_s = (float(metrics[k]) if k in metrics else None for k in ("train/loss", "train/tokens_per_s"))
        elapsed = time.perf_counter() - self._started
        log.info(progress_line(step, total, loss, tokens_per_s, elapsed, step - self._first_step))
