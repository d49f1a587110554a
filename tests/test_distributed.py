"""threshold_scope=global: two CPU processes (gloo) with 4 samples each decide exactly as one process with all 8 (the
module gathers the statistics; the policy only decides on what it is given)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qtuning.module import decide
from qtuning.pruning import BatchStats, QTuningPolicy


def global_batch() -> tuple[BatchStats, BatchStats, BatchStats]:
    """Eight random samples; rank 0 gets rows 0-3 at 7 positions, rank 1 rows 4-7 at 10 (so shapes differ)."""
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 7, 5, 6, 10, 8, 9, 10]
    nonpad = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]  # [8, 10]
    response = nonpad & (torch.arange(10)[None, :] >= 2)
    nll = torch.rand(8, 10, generator=gen) * 4 * response
    entropy = torch.rand(8, 10, generator=gen) * 3 * nonpad
    full = BatchStats(response, nonpad, token_nll=nll, token_entropy=entropy)

    def part(rows: slice, length: int) -> BatchStats:
        return BatchStats(
            response[rows, :length], nonpad[rows, :length], token_nll=nll[rows, :length],
            token_entropy=entropy[rows, :length],
        )  # fmt: skip

    return full, part(slice(0, 4), 7), part(slice(4, 8), 10)


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _, first, second = global_batch()
        policy = QTuningPolicy(0.25, 0.5, threshold_scope="global")
        decision = decide(policy, first if rank == 0 else second, across_devices=True)
        torch.save({"keep": decision.sample_keep, "tokens": decision.token_keep}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes
def test_global_threshold_scope_decides_like_one_process(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    full, _, _ = global_batch()
    single = QTuningPolicy(0.25, 0.5).select(full)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(torch.cat([r["keep"] for r in ranks]), single.sample_keep)
    assert torch.equal(ranks[0]["tokens"], single.token_keep[:4, :7])
    assert torch.equal(ranks[1]["tokens"], single.token_keep[4:, :10])
    local = [QTuningPolicy(0.25, 0.5).select(part).sample_keep for part in global_batch()[1:]]
    assert not torch.equal(torch.cat(local), single.sample_keep)  # deciding per half would differ here
