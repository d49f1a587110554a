"""``pruner=combo``: a dataset-level sample pruner composed with an in-batch token pruner (the paper's baselines)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from qtuning.data.plan import EpochPlan, SampleInfo
from qtuning.ops.stats import BatchStats
from qtuning.pruning.base import PruneDecision, PruningPolicy
from qtuning.pruning.sample_level import SamplePruner


class ComboPolicy(PruningPolicy):
    """Each epoch trains on ``sample``'s plan (an `EpochPlanner` for the data module, handed over by
    `SFTDataModule.connect`); each step ``token`` decides which positions count, and the plan's per-sample weights
    (InfoBatch's 1/r) scale the loss.

    ``pruner=combo pruner/sample=<random|longest|shortest|entropy|infobatch|none> pruner/token=<random|ppl|fastv|
    sparsevlm|rho1|none>``; the token pruner's ``loss_norm`` and ``scoring`` apply.
    """

    def __init__(self, sample: SamplePruner, token: PruningPolicy) -> None:
        super().__init__(token.loss_norm, token.scoring)
        self.sample_pruner = sample
        self.token = token
        self.needs_scores = token.needs_scores
        self.sample_weights: Tensor | None = None  # [N] of the current epoch's plan
        self.epoch_fraction = 1.0

    # EpochPlanner, for the data module

    def epoch_plan(self, epoch: int, info: SampleInfo, max_epochs: int) -> EpochPlan:
        plan = self.sample_pruner.plan(epoch, info, max_epochs)
        self.sample_weights = plan.weights
        self.epoch_fraction = plan.indices.numel() / max(1, len(info.instructions))
        return plan

    def planned_sizes(self, epoch: int, info: SampleInfo, max_epochs: int) -> list[int]:
        return self.sample_pruner.planned_sizes(epoch, info, max_epochs)

    # the policy

    def enrich(self, model: torch.nn.Module, batch: dict[str, Tensor], stats: BatchStats) -> BatchStats:
        return self.token.enrich(model, batch, stats)

    def select(self, stats: BatchStats) -> PruneDecision:
        decision = self.token.select(stats)
        if self.sample_weights is not None and bool((self.sample_weights != 1).any()):
            decision.loss_scale = self.sample_weights.to(stats.response_mask.device)[stats.sample_idx]  # [B]
            decision.metrics["loss_scale_mean"] = float(decision.loss_scale.mean())
        decision.metrics["epoch_samples"] = self.epoch_fraction  # this epoch's plan / training set
        return decision

    # Lightning hooks: the token pruner's (Rho-1 loads its reference in setup) and the losses the sample pruner scores.

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.token.setup(trainer, pl_module, stage)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not outputs:  # a skipped (non-finite) step recorded nothing
            return
        sample_idx, losses = outputs["row_losses"]
        if trainer.world_size > 1:  # every rank records every sample, so all ranks plan the same epochs
            sample_idx, losses = pl_module.all_gather(sample_idx).flatten(), pl_module.all_gather(losses).flatten()
        self.sample_pruner.record(sample_idx, losses)

    def state_dict(self) -> dict[str, Any]:
        return {"sample": self.sample_pruner.state_dict(), "token": self.token.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sample_pruner.load_state_dict(state_dict["sample"])
        self.token.load_state_dict(state_dict["token"])
