"""Deciding on the global batch: gather every rank's `BatchStats`, decide once, keep this rank's rows.

With ``threshold_scope: global`` a Q-Tuning decision then does not depend on how the batch is split over devices:
2 devices × 4 samples decide exactly as 1 device × 8 samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from qtuning.pruning.base import PruneDecision
from qtuning.pruning.stats import BatchStats


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(tensor: Tensor, rows: list[int], length: int) -> Tensor:
    """All ranks' ``[B_r, T_r]`` tensors, right-padded to the largest shape, concatenated over rows in rank order."""
    padded = torch.zeros(max(rows), length, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0], : tensor.shape[1]] = tensor
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])


def gather_stats(stats: BatchStats) -> tuple[BatchStats, int]:
    """The global batch (positions padded to the longest; padding is masked out) and this rank's first row in it."""
    batch, length = stats.response_mask.shape
    shape = torch.tensor([batch, length], device=stats.response_mask.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    longest = max(int(s[1]) for s in shapes)
    fields = ("response_mask", "nonpad_mask", "token_nll", "token_entropy")
    gathered = {name: _gather_rows(getattr(stats, name), rows, longest) for name in fields}
    return BatchStats(**gathered), sum(rows[: dist.get_rank()])


def local_rows(decision: PruneDecision, offset: int, batch: int, length: int) -> PruneDecision:
    """This rank's slice of a decision made on the global batch."""
    rows = slice(offset, offset + batch)

    def local(per_sample: Tensor | None) -> Tensor | None:
        return per_sample[rows] if per_sample is not None else None

    return PruneDecision(
        sample_keep=decision.sample_keep[rows],
        token_keep=decision.token_keep[rows, :length],
        quadrant=local(decision.quadrant),
        ppl=local(decision.ppl),
        entropy=local(decision.entropy),
        metrics=decision.metrics,
    )
