"""Learning-rate schedule, built once the run length is known (``trainer.estimated_stepping_batches``)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    """Linear warm-up over ``ceil(warmup_ratio · total_steps)`` steps, then cosine decay to ``min_lr_ratio · lr``.

    ``total_steps`` may be revised during training (a dataset-level pruner whose epochs change length); the warm-up
    length stays as first computed. Both are checkpointed with the scheduler.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_ratio: float = 0.1,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"scheduler.warmup_ratio={warmup_ratio} must be in [0, 1)")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"scheduler.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        self.total_steps = total_steps
        self.warmup_steps = math.ceil(warmup_ratio * total_steps)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
