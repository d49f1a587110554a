"""Learning-rate schedule, built once the run length is known (``trainer.estimated_stepping_batches``)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.1, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up over ``ceil(warmup_ratio · total_steps)`` steps, then cosine decay to ``min_lr_ratio · lr``."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"scheduler.warmup_ratio={warmup_ratio} must be in [0, 1)")
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=math.ceil(warmup_ratio * total_steps),
        num_training_steps=total_steps,
        min_lr_rate=min_lr_ratio,
    )
