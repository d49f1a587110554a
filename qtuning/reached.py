"""Which training samples reached the loss, from the run's own decisions: per optimizer step, the ``sample_idx`` of
every row with a response token in the loss, and of every row the sample decision kept (a kept row whose response
tokens were all pruned is kept but does not reach the loss), written to ``<output_dir>/reached_loss.json`` at the
end of training; and, given each sample's kind (e.g. the corruption `experiments.corrupt` recorded), the fraction
of each kind that reached the loss (or was kept).

    callbacks.reached._target_=qtuning.reached.ReachedLossLog     # or a `callbacks:` entry of an experiment
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor

from qtuning.outputs import write_atomic
from qtuning.pruning import BatchStats, PruneDecision

FILENAME = "reached_loss.json"


def sample_indices(stats: BatchStats, rows: Tensor) -> list[int]:
    """The sorted ``sample_idx`` of the batch rows where ``rows`` [B] is true."""
    if stats.sample_idx is None:
        raise ValueError("the batch's BatchStats carry no sample_idx")
    return sorted(stats.sample_idx[rows].tolist())


def reached_rows(stats: BatchStats, decision: PruneDecision) -> list[int]:
    """The ``sample_idx`` of the kept rows with at least one response token in the loss. Response tokens, not any
    kept position: under ``loss_norm: nonpad`` a row may keep only prompt positions, whose loss is 0."""
    return sample_indices(stats, decision.sample_keep & (decision.token_keep & stats.response_mask).any(1))  # [B]


def kept_rows(stats: BatchStats, decision: PruneDecision) -> list[int]:
    """The ``sample_idx`` of the rows the sample decision kept, whatever their tokens."""
    return sample_indices(stats, decision.sample_keep)


def reach_counts(steps: Sequence[Sequence[int]], n_samples: int) -> list[int]:
    """How many optimizer steps each of ``n_samples`` samples reached the loss in, from each step's list."""
    counts = [0] * n_samples
    for reached in steps:
        for i in reached:
            counts[i] += 1
    return counts


def reached_fractions(counts: Sequence[int], kinds: Sequence[str], epochs: int) -> dict[str, float]:
    """Per kind: the share of its samples' chances that reached the loss, ``Σ counts / (samples of the kind ·
    epochs)`` (every sample has one chance per epoch: full data gives 1 for every kind)."""
    if len(counts) != len(kinds):
        raise ValueError(f"{len(counts)} sample counts for {len(kinds)} kinds")
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1")
    totals: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for count, kind in zip(counts, kinds, strict=True):
        totals[kind] = totals.get(kind, 0) + count
        sizes[kind] = sizes.get(kind, 0) + 1
    return {kind: totals[kind] / (sizes[kind] * epochs) for kind in sizes}


class ReachedLossLog(L.Callback):
    """Records, for each optimizer step, the samples with a response token in its loss and the samples kept; the
    record is part of the callback's state, so a checkpoint carries it and a resumed run writes the same file as an
    uninterrupted one.

    Single-device runs: under DDP each process sees its own batches, and only the first one's are written.

    ``reached_loss.json``: ``locations`` (each training ``sample_idx``'s ``file:line``), ``epochs`` (those trained)
    and ``steps`` (``[step, epoch, [reached sample_idx, ...], [kept sample_idx, ...]]`` per optimizer step,
    0-based)."""

    def __init__(self, filename: str = FILENAME) -> None:
        self.filename = filename
        self.steps: dict[int, tuple[int, list[int], list[int]]] = {}  # optimizer step -> (epoch, reached, kept)
        self._step = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # the steps already taken: the optimizer step this micro-batch belongs to (accumulation included)
        self._step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not outputs:  # a skipped micro-batch (non-finite loss): nothing reached the loss
            return
        stats, decision = outputs["stats"], outputs["decision"]
        epoch, reached, kept = self.steps.get(self._step, (trainer.current_epoch, [], []))
        reached, kept = sorted(reached + reached_rows(stats, decision)), sorted(kept + kept_rows(stats, decision))
        self.steps[self._step] = (epoch, reached, kept)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        record = {
            "locations": [e.location for e in data.train_examples],
            "epochs": len({epoch for epoch, _, _ in self.steps.values()}),
            "steps": [[step, *entry] for step, entry in sorted(self.steps.items())],
        }
        write_atomic(Path(trainer.default_root_dir) / self.filename, json.dumps(record) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"steps": [[step, *entry] for step, entry in self.steps.items()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = {
            int(step): (int(epoch), list(reached), list(kept)) for step, epoch, reached, kept in state_dict["steps"]
        }
