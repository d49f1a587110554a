"""Multi-process training on CPU (trainer=ddp_cpu: 2 processes, gloo) runs every kind of policy to the end, and a
dataset-level policy's state (InfoBatch's scores and epoch plan) is the same on both ranks, and the token totals are
those of both ranks together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, tiny_cli_args

pytestmark = pytest.mark.slow  # subprocess runs

CASES = {
    "qtuning-local": ["pruner=qtuning"],
    "qtuning-global": ["pruner=qtuning", "pruner.threshold_scope=global"],
    "infobatch": ["pruner=combo", "pruner/sample=infobatch", "pruner/token=ppl"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_cpu_processes_train_to_the_end(tmp_path: Path, case: str):
    run_dir = tmp_path / "run"
    result = run_cli(
        *tiny_cli_args(tmp_path, *CASES[case]),
        "trainer=ddp_cpu", "budget=s50_t70", "trainer.max_steps=-1", "trainer.max_epochs=3",
        "+callbacks.dump._target_=tests.signals.DumpPolicyState", f"+callbacks.dump.dirpath={run_dir}",
        "+callbacks.sums._target_=tests.signals.SumLoggedPositions", f"+callbacks.sums.dirpath={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
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
