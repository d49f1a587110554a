"""Multi-process training on CPU (trainer=ddp_cpu: 2 processes, gloo) runs every kind of policy to the end, and a
dataset-level policy's state (InfoBatch's scores and epoch plan) is the same on both ranks, and the token totals are
those of both ranks together. The runs are made by one pair of processes started as torchrun would start them
(`tests.ranks`); the runs of `tests/test_window.py` and `tests/test_no_hang.py` start theirs through Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_OVERRIDES, made_once, run_on_two_ranks

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp")]  # runs of two processes

CASES = {
    "qtuning-local": ["pruner=qtuning"],
    "qtuning-global": ["pruner=qtuning", "pruner.threshold_scope=global"],
    "infobatch": ["pruner=combo", "pruner/sample=infobatch", "pruner/token=ppl"],
}


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case for three epochs, by one pair of processes (`tests.ranks`), made once in the session."""

    def make(root: Path) -> None:
        jobs = []
        for case, overrides in CASES.items():
            run_dir = root / case
            jobs.append((run_dir, [
                *TINY_OVERRIDES, *overrides, "trainer=ddp_cpu", "budget=s50_t70", "trainer.max_steps=-1",
                "trainer.max_epochs=3",
                "+callbacks.dump._target_=tests.signals.DumpPolicyState", f"+callbacks.dump.dirpath={run_dir}",
                "+callbacks.sums._target_=tests.signals.SumLoggedPositions", f"+callbacks.sums.dirpath={run_dir}",
            ]))  # fmt: skip
        run_on_two_ranks(jobs)

    return made_once(tmp_path_factory, "ddp", make)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_cpu_processes_train_to_the_end(runs: Path, case: str):
    run_dir = runs / case
    errors = sorted(run_dir.glob("error_rank*.txt"))
    assert not errors, errors[0].read_text()[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the run's totals are over both processes: each rank logged only its own micro-batches
    fwd, bwd = sum(torch.load(run_dir / f"positions_rank{rank}.pt") for rank in (0, 1)).tolist()
    assert (metrics["prune/fwd_tokens_total"], metrics["prune/bwd_tokens_total"]) == (fwd, bwd)
    states = [torch.load(run_dir / f"policy_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    if case == "infobatch":
        # 40 rows, 2 processes x 4: 5 steps in epoch 0, fewer once pruned; both ranks recorded every sample
        scores = [state["sample"]["scores"] for state in states]
        assert not torch.equal(scores[0], torch.ones(40))  # real losses were recorded
        assert torch.equal(scores[0], scores[1])
        plans = [state["sample"]["current"] for state in states]
        assert plans[0][0] == plans[1][0] == 2 and torch.equal(plans[0][1], plans[1][1])
