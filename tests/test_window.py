"""threshold_scope=window: one Q-Tuning decision per optimizer step, over every micro-batch of the accumulation window
on every device, then the kept rows re-packed into training micro-batches.

The plain reference is the default path with one micro-batch of 8 rows per optimizer step (``local``, Lightning's
automatic optimization): there a window of 8 rows is that micro-batch. One process × 8, one process × 2 × 4
accumulated and two processes × 4 must keep the same samples, log the same loss at every step and end with the same
weights as it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from qtuning.errors import QTuningError
from qtuning.ops.passes import length_groups
from qtuning.ops.stats import concat_stats
from qtuning.pruning import BatchStats
from qtuning.train import train
from tests.conftest import TINY_OVERRIDES, add_callbacks, compose_train, run_cli, tiny_cli_args
from tests.test_resume import assert_same_run, run, step_losses

WINDOW = "pruner.threshold_scope=window"
# 40 training rows: 5 windows of 8 rows, one epoch
STEPS = ["pruner=qtuning", "trainer.max_steps=5", "validate_before_fit=false"]
LAYOUTS = {
    "1x8": ["data.batch_size=8", WINDOW],
    "1x2x4": ["data.batch_size=2", "trainer.accumulate_grad_batches=4", WINDOW],
}
# s50: 4 of each window's 8 rows kept; s12: 1, so in two processes one of them has nothing to train at every step
# (its tokens pruned per sample: the batch budget often drops the whole response of a lone Q2 sample)
BUDGETS = {"s50": ["budget=s50_t70"], "s12": ["budget=s12_t50", "pruner.token_budget=per_sample"]}
KEPT_PER_STEP = {"s50": 4, "s12": 1}


def record(run_dir: Path) -> list[str]:
    return ["+callbacks.rec._target_=tests.signals.RecordSteps", f"+callbacks.rec.dirpath={run_dir}"]


def recorded(run_dir: Path, world: int = 1) -> dict:
    """Every step's kept samples (over all processes), logged loss, and the final weights, from `RecordSteps`."""
    ranks = [torch.load(run_dir / f"steps_rank{r}.pt", weights_only=True) for r in range(world)]
    for other in ranks[1:]:
        assert other["losses"] == ranks[0]["losses"]  # every process logs the loss of the whole window
    kept = [sorted(sum(step, [])) for step in zip(*(r["kept"] for r in ranks), strict=True)]
    return {"kept": kept, "losses": ranks[0]["losses"], "weights": ranks[0]["weights"], "per_rank": ranks}


def train_in_process(run_dir: Path, *overrides: str) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    train(compose_train([*TINY_OVERRIDES, *STEPS, *overrides, *record(run_dir)], run_dir))
    return recorded(run_dir)


def assert_same_steps(got: dict, reference: dict) -> None:
    assert got["kept"] == reference["kept"]
    assert got["losses"] == pytest.approx(reference["losses"], rel=0, abs=1e-5)
    assert reference["weights"]
    for name, weight in reference["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The default local path, one micro-batch of 8 rows per step, for each budget."""
    runs = {}
    for name, budget in BUDGETS.items():
        runs[name] = train_in_process(tmp_path_factory.mktemp(f"local8_{name}"), "data.batch_size=8", *budget)
        assert len(runs[name]["kept"]) == 5
        assert all(len(kept) == KEPT_PER_STEP[name] for kept in runs[name]["kept"])
        assert len(set(runs[name]["losses"])) == 5  # the model moves
    return runs


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_one_process_windows_equal_one_micro_batch_of_the_window(tmp_path, reference, layout, budget):
    got = train_in_process(tmp_path, *LAYOUTS[layout], *BUDGETS[budget])
    assert_same_steps(got, reference[budget])
    # the dashboard's decision: 8 rows, the budget's share kept, as the local micro-batch of 8 (not 2 rows under 2 × 4)
    assert got["per_rank"][0]["decisions"] == [(8.0, KEPT_PER_STEP[budget] / 8)] * 5
    assert reference[budget]["per_rank"][0]["decisions"] == got["per_rank"][0]["decisions"]


def test_local_decisions_under_accumulation_keep_other_samples(tmp_path, reference, monkeypatch):
    """Without the window, 2 × 4 accumulated decides on each micro-batch of 2: another kept set (so the equalities
    above are not vacuous)."""
    kept: list[list[int]] = []

    class Kept(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            kept.append(sorted(outputs["stats"].sample_idx[outputs["decision"].sample_keep].tolist()))

    add_callbacks(monkeypatch, Kept())
    overrides = ["data.batch_size=2", "trainer.accumulate_grad_batches=4", *BUDGETS["s50"]]
    train(compose_train([*TINY_OVERRIDES, *STEPS, *overrides], tmp_path))
    windows = [sorted(sum(kept[i : i + 4], [])) for i in range(0, len(kept), 4)]
    assert len(windows) == 5 and windows != reference["s50"]["kept"]


@pytest.mark.slow  # subprocess runs
@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_two_processes_decide_and_train_as_one(tmp_path, reference, budget):
    run_dir = tmp_path / "run"
    args = tiny_cli_args(tmp_path, *STEPS, "trainer=ddp_cpu", "data.batch_size=4", WINDOW, *BUDGETS[budget])
    result = run_cli(*args, *record(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    got = recorded(run_dir, world=2)
    assert_same_steps(got, reference[budget])
    for rank in got["per_rank"]:  # the dashboard's decision: 8 rows over both processes, the budget's share kept
        assert rank["decisions"] == [(8.0, KEPT_PER_STEP[budget] / 8)] * 5
    rank_kept = [r["kept"] for r in got["per_rank"]]
    if budget == "s12":  # each step one process kept nothing, trained a weight-0 row and still joined the all-reduce
        assert all(not a or not b for a, b in zip(*rank_kept, strict=True))
    else:
        assert all(a and b for a, b in zip(*rank_kept, strict=True))


# 40 rows in windows of 2 × 4: 5 steps an epoch, 14 steps into the third epoch; 4 kept rows a window, trained as two
# micro-batches of 2. Killed just before the second backward pass of step 8: back to the checkpoint of step 6.
RESUME = ["pruner=qtuning", "budget=s50_t70", "data.batch_size=2", "trainer.accumulate_grad_batches=4", WINDOW]
KILL_MID_WINDOW = ["+callbacks.signal._target_=tests.signals.SignalAtBackward", "+callbacks.signal.step=8",
                   "+callbacks.signal.backward=2", "+callbacks.signal.signal_name=SIGKILL"]  # fmt: skip


@pytest.mark.slow  # subprocess runs
def test_a_run_killed_mid_window_resumes_at_the_window_start(tmp_path):
    whole = tmp_path / "whole"
    result = run(whole, *RESUME)
    assert result.returncode == 0, result.stderr[-3000:]
    killed_dir = tmp_path / "killed"
    killed = run(killed_dir, *RESUME, *KILL_MID_WINDOW)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert max(step_losses(killed_dir)) == 6  # steps 1-7 logged (as 0-6), step 8 under way
    resumed = run(killed_dir, *RESUME, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(killed_dir, whole)


def test_window_needs_the_separate_scoring_pass(tiny_cfg):
    cfg = tiny_cfg("pruner=qtuning", WINDOW, "pruner.scoring=shared")
    with pytest.raises(QTuningError, match=r"pruner: threshold_scope=window .* needs scoring=separate, not shared"):
        train(cfg)


def test_concat_stats_pads_positions_and_keeps_rows_in_order():
    a = BatchStats(torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool),
                   token_nll=torch.full((2, 3), 1.0), token_entropy=torch.full((2, 3), 2.0),
                   sample_idx=torch.tensor([5, 6]))  # fmt: skip
    b = BatchStats(torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool),
                   token_nll=torch.full((1, 5), 3.0), token_entropy=torch.full((1, 5), 4.0),
                   sample_idx=torch.tensor([1]))  # fmt: skip
    both = concat_stats([a, b])
    assert both.nonpad_mask.tolist() == [[True] * 3 + [False] * 2] * 2 + [[True] * 5]
    assert both.response_mask.tolist() == [[True] * 3 + [False] * 2] * 2 + [[False] * 5]
    assert both.token_nll.tolist() == [[1.0] * 3 + [0.0] * 2] * 2 + [[3.0] * 5]
    assert both.token_entropy[2].tolist() == [4.0] * 5
    assert both.sample_idx.tolist() == [5, 6, 1]
    assert both.ref_nll is None and both.token_scores is None


def test_length_groups_sort_the_kept_rows_by_length_in_groups_of_at_most_size():
    keep = torch.tensor([True, False, True, True, True, True])
    lengths = torch.tensor([9, 1, 3, 7, 3, 5])
    groups = length_groups(keep, lengths, 2)
    assert [g.tolist() for g in groups] == [[2, 4], [5, 3], [0]]
    assert [g.tolist() for g in length_groups(torch.zeros(3, dtype=torch.bool), lengths[:3], 2)] == [[]]
