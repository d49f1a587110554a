"""Collectives over statistics: a decision whose scope spans devices is made on every device's `BatchStats`.

With ``threshold_scope: global`` a Q-Tuning decision then does not depend on how the batch is split over devices:
2 devices × 4 samples decide exactly as 1 device × 8 samples. The module gathers; a policy only ever sees what it is
given.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from qtuning.ops.stats import BatchStats


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(tensor: Tensor, rows: list[int], length: int) -> Tensor:
    """All ranks' ``[B_r, T_r]`` tensors, right-padded to the largest shape, concatenated over rows in rank order."""
    padded = torch.zeros(max(rows), length, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0], : tensor.shape[1]] = tensor
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])


def gather_stats(stats: BatchStats) -> tuple[BatchStats, int]:
    """The statistics of every rank's rows (positions padded to the longest; padding is masked out), and this rank's
    first row in them."""
    batch, length = stats.response_mask.shape
    shape = torch.tensor([batch, length], device=stats.response_mask.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    longest = max(int(s[1]) for s in shapes)
    fields = ("response_mask", "nonpad_mask", "token_nll", "token_entropy")
    gathered = {name: _gather_rows(getattr(stats, name), rows, longest) for name in fields}
    return BatchStats(**gathered), sum(rows[: dist.get_rank()])


def finite_on_every_device(loss: Tensor) -> bool:
    """Whether ``loss`` is finite here and on every other device: the devices then skip a pass together or train it
    together, and none is left waiting alone in a collective of the backward."""
    return not any_device(not bool(torch.isfinite(loss.detach())), loss.device)


def most_on_any_device(count: int, device: torch.device) -> int:
    """The largest ``count`` of any device (a max all-reduce)."""
    if world_size() == 1:
        return count
    value = torch.tensor([count], dtype=torch.int64, device=device)  # [1]
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def any_device(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any device, so that every device acts on it together."""
    return bool(most_on_any_device(int(flag), device))
