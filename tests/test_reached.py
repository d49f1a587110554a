"""Which samples reached the loss: hand-built decisions, the per-kind fractions by hand, the callback's record through
micro-batches, a checkpoint and a kill."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qtuning.pruning import BatchStats, PruneDecision
from qtuning.reached import ReachedLossLog, kept_rows, reach_counts, reached_fractions, reached_rows
from tests.conftest import ROOT, TINY_OVERRIDES

# 4 rows, 5 target positions: rows 0-2 have a prompt (positions 0-1) then a response (2-4); row 3 is padded after 3.
RESPONSE = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
NONPAD = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)


def stats(sample_idx: list[int]) -> BatchStats:
    return BatchStats(response_mask=RESPONSE, nonpad_mask=NONPAD, sample_idx=torch.tensor(sample_idx))


def decision(sample_keep: list[int], token_keep: list[list[int]]) -> PruneDecision:
    return PruneDecision(torch.tensor(sample_keep, dtype=torch.bool), torch.tensor(token_keep, dtype=torch.bool))


# row 0: kept, every response token; row 1: kept, one response token; row 2: kept, prompt positions only (nonpad
# loss norm, every response token dropped); row 3: dropped
MIXED = decision([1, 1, 1, 0], [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])


def test_reached_rows_are_the_kept_rows_with_a_response_token_in_the_loss():
    assert reached_rows(stats([7, 3, 5, 9]), MIXED) == [3, 7]  # sorted; 5 kept only prompt positions, 9 dropped
    assert kept_rows(stats([7, 3, 5, 9]), MIXED) == [3, 5, 7]  # 5 is kept all the same


def test_reached_and_kept_rows_need_the_sample_index():
    for rows in (reached_rows, kept_rows):
        with pytest.raises(ValueError, match="sample_idx"):
            rows(BatchStats(response_mask=RESPONSE, nonpad_mask=NONPAD), MIXED)


def test_reach_counts_and_fractions_by_hand():
    # 6 samples over 2 epochs (4 steps): sample 0 reached in 2 steps, 1 in 1, 2 in 2, 3 in 0, 4 in 1, 5 in 2
    steps = [[0, 2], [5, 1], [0, 5], [2, 4]]
    counts = reach_counts(steps, 6)
    assert counts == [2, 1, 2, 0, 1, 2]
    kinds = ["clean", "loop", "clean", "loop", "mismatched", "clean"]
    # clean: (2 + 2 + 2) / (3 · 2) = 1; loop: (1 + 0) / (2 · 2) = 0.25; mismatched: 1 / (1 · 2) = 0.5
    assert reached_fractions(counts, kinds, epochs=2) == {"clean": 1.0, "loop": 0.25, "mismatched": 0.5}


def test_reached_fractions_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="3 sample counts for 2 kinds"):
        reached_fractions([1, 2, 3], ["clean", "loop"], epochs=1)
    with pytest.raises(ValueError, match="epochs=0"):
        reached_fractions([1], ["clean"], epochs=0)


def test_the_callback_records_each_optimizer_step_through_accumulation_and_its_state(tmp_path):
    log = ReachedLossLog()
    examples = [SimpleNamespace(location=f"train.jsonl:{line}") for line in range(1, 11)]
    trainer = SimpleNamespace(
        global_step=0, current_epoch=0, is_global_zero=True, default_root_dir=str(tmp_path),
        datamodule=SimpleNamespace(train_examples=examples),
    )  # fmt: skip
    out = {"stats": stats([7, 3, 5, 9]), "decision": MIXED}
    everything = {"stats": stats([0, 1, 2, 4]), "decision": decision([1, 1, 1, 1], NONPAD.int().tolist())}
    # step 0 in two micro-batches (accumulation), then a skipped micro-batch, then step 1 in epoch 1
    for step, epoch, outputs in [(0, 0, out), (0, 0, everything), (1, 0, None), (1, 1, out)]:
        trainer.global_step, trainer.current_epoch = step, epoch
        log.on_train_batch_start(trainer, None, None, 0)
        log.on_train_batch_end(trainer, None, outputs, None, 0)
    # reached, then kept: 5 kept with its prompt only, in both steps
    assert log.steps == {0: (0, [0, 1, 2, 3, 4, 7], [0, 1, 2, 3, 4, 5, 7]), 1: (1, [3, 7], [3, 5, 7])}

    restored = ReachedLossLog()
    restored.load_state_dict(log.state_dict())
    assert restored.steps == log.steps
    restored.on_train_end(trainer, None)
    record = json.loads((tmp_path / "reached_loss.json").read_text())
    assert record == {
        "locations": [f"train.jsonl:{line}" for line in range(1, 11)],
        "epochs": 2,
        "steps": [[0, 0, [0, 1, 2, 3, 4, 7], [0, 1, 2, 3, 4, 5, 7]], [1, 1, [3, 7], [3, 5, 7]]],
    }


# A tiny Q-Tuning run (decisions from the model), killed mid-epoch and resumed: the same record as a whole run.
RUN = [
    *[o for o in TINY_OVERRIDES if not o.startswith(("callbacks=", "trainer.max_steps="))],
    "trainer.max_steps=14",
    "trainer.max_epochs=3",
    "callbacks=default",
    "~callbacks.dashboard",
    "+callbacks.reached._target_=qtuning.reached.ReachedLossLog",
    "ckpt_every_n_steps=3",
    "validate_before_fit=false",
    "pruner=qtuning",
    "budget=s50_t70",
]


def run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "qtuning.train", *RUN, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_killed_and_resumed_run_writes_the_record_of_a_whole_one(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(whole).returncode == 0
    signal = ["+callbacks.signal._target_=tests.signals.SignalAtStep", "+callbacks.signal.step=8",
              "+callbacks.signal.signal_name=SIGKILL"]  # fmt: skip
    assert run(killed, *signal).returncode == -9  # back to the checkpoint of step 6
    resumed = run(killed, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((whole / "reached_loss.json").read_text())
    assert len(expected["steps"]) == 14 and expected["epochs"] == 2  # 40 rows, batches of 4: 10 steps an epoch
    # s50 of 4 rows: the fill-up keeps at least 2 at every step, and only kept rows reach the loss
    assert all(len(kept) >= 2 and set(reached) <= set(kept) for _, _, reached, kept in expected["steps"])
    assert json.loads((killed / "reached_loss.json").read_text())["steps"] == expected["steps"]
