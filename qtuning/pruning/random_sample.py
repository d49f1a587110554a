"""In-batch random sample pruning: keeps K = max(1, round(B · r_sample)) rows of every batch, uniformly at random."""

from __future__ import annotations

from typing import Any

import torch

from qtuning.ops.stats import BatchStats
from qtuning.pruning.base import SFT_LOSS_NORM, PruneDecision, PruningPolicy, check_ratio, keep_count


class RandomSamplePolicy(PruningPolicy):
    """Drops random rows per step. Its own seeded generator is checkpointed, so a resumed run draws the same rows."""

    def __init__(self, r_sample: float, seed: int = 0, loss_norm: str = SFT_LOSS_NORM) -> None:
        super().__init__(loss_norm)
        self.r_sample = check_ratio("r_sample", r_sample)
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, stats: BatchStats) -> PruneDecision:
        batch_size = stats.batch_size
        chosen = torch.randperm(batch_size, generator=self.generator)[: keep_count(batch_size, self.r_sample)]
        keep = torch.zeros(batch_size, dtype=torch.bool)
        keep[chosen] = True
        return self.keep_rows(stats, keep.to(stats.response_mask.device))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
