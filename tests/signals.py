"""Test callbacks and policies the CLI can load by name: a signal on cue (a preemption or a crash, also in the middle
of a window), a dump of the policy state, each rank's own sums of logged positions, a record of every step, and
policies that keep nothing or give non-finite losses."""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor

from qtuning.pruning import NoPruning, QTuningPolicy
from qtuning.reached import kept_rows


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if isinstance(param, DTensor) else param


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


class SignalAtBackward(Callback):
    """Sends ``signal_name`` to this process just before the ``backward``-th backward pass (1-based) of optimizer step
    ``step``: in the middle of a window that `SFTModule.train_kept` trains in several micro-batches."""

    def __init__(self, step: int, backward: int, signal_name: str) -> None:
        self.step, self.backward = step, backward
        self.signum = getattr(signal, signal_name)
        self.seen: dict[int, int] = {}  # backward passes so far, by the number of optimizer steps done

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        done = trainer.global_step
        self.seen[done] = self.seen.get(done, 0) + 1
        if done == self.step - 1 and self.seen[done] == self.backward:
            os.kill(os.getpid(), self.signum)


class RecordSteps(Callback):
    """Records, each optimizer step (one training batch, no accumulation by Lightning), the ``sample_idx`` of the rows
    this process kept and of those it trained (a skipped pass trains none), and the logged ``train/loss``; at the end
    of training saves them with the final trainable weights to ``<dirpath>/steps_rank<r>.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.kept: list[list[int]] = []
        self.trained: list[list[int]] = []
        self.losses: list[float] = []
        self.decisions: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not outputs or "decision" not in outputs:  # every pass of the step was skipped (a non-finite loss)
            self.kept.append([])
            self.trained.append([])
        else:
            self.kept.append(kept_rows(outputs["stats"], outputs["decision"]))
            self.trained.append(sorted(outputs["row_losses"][0].tolist()))  # the rows of the passes not skipped
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        metrics = trainer.callback_metrics  # Q-Tuning's: the rows its decision covered (every process's) and kept
        if "prune/decision_rows" in metrics:
            self.decisions.append((float(metrics["prune/decision_rows"]), float(metrics["prune/decision_keep"])))

    def on_train_end(self, trainer, pl_module) -> None:
        # sharded parameters (FSDP2) are gathered whole, by every process
        weights = {k: full_tensor(p).detach().clone() for k, p in pl_module.model.named_parameters() if p.requires_grad}
        sharded = any(isinstance(p, DTensor) for p in pl_module.model.parameters())
        record = {"kept": self.kept, "trained": self.trained, "losses": self.losses, "decisions": self.decisions,
                  "weights": weights, "sharded": sharded}  # fmt: skip
        torch.save(record, os.path.join(self.dirpath, f"steps_rank{trainer.global_rank}.pt"))


class DumpPolicyState(Callback):
    """Saves this process's policy state at the end of training to ``<dirpath>/policy_rank<r>.pt`` (to compare the
    ranks of a multi-process run)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.policy.state_dict(), os.path.join(self.dirpath, f"policy_rank{trainer.global_rank}.pt"))


class SumLoggedPositions(Callback):
    """Sums this process's own ``prune/fwd_tokens`` and ``prune/bwd_tokens`` of every micro-batch and saves them at
    the end of training to ``<dirpath>/positions_rank<r>.pt`` (``[2]``: forward, backward)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.sums = torch.zeros(2, dtype=torch.long)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        self.sums += torch.tensor([int(logged["prune/fwd_tokens"]), int(logged["prune/bwd_tokens"])])

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.sums, os.path.join(self.dirpath, f"positions_rank{trainer.global_rank}.pt"))


class KeepNothing(NoPruning):
    """A policy that keeps no sample: the step must contribute 0, not NaN."""

    def select(self, stats):
        decision = super().select(stats)
        decision.sample_keep[:] = False
        decision.token_keep[:] = False
        return decision


class NonFiniteFirst(NoPruning):
    """A policy whose loss weights are NaN for its first ``bad`` batches: those steps must be skipped."""

    def __init__(self, bad: int, loss_norm: str = "response") -> None:
        super().__init__(loss_norm)
        self.bad = bad

    def select(self, stats):
        decision = super().select(stats)
        if self.bad > 0:
            self.bad -= 1
            decision.loss_scale = torch.full((stats.batch_size,), float("nan"))
        return decision


class NonFiniteOnRankOneFirst(QTuningPolicy):
    """Q-Tuning whose loss weights are NaN on rank 1 in its first decision: in window scope that process skips every
    micro-batch of the window, its last one included, while the others wait in that backward's all-reduce."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spoiled = False

    def select(self, stats):
        decision = super().select(stats)
        if not self.spoiled and torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            self.spoiled = True
            decision.loss_scale = torch.full((stats.batch_size,), float("nan"))
        return decision
