"""Runs that survive: killed (SIGKILL) or preempted (SIGTERM, SIGUSR1) mid-epoch, resumed with resume=auto, they end
with the same parameters, the same per-step losses and the same token totals as an uninterrupted run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtuning import TOKEN_TOTALS
from tests.conftest import ROOT, TINY_OVERRIDES, made_once

# subprocess runs, on one worker mostly (the uninterrupted reference runs are made once: made_once)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume")]

# 40 training rows in batches of 4: 10 steps an epoch, so 14 steps cross an epoch boundary.
RUN = [
    *[o for o in TINY_OVERRIDES if not o.startswith(("logger=", "callbacks=", "save_model="))],
    "trainer.max_steps=14",
    "trainer.max_epochs=3",
    "logger=csv",
    "+logger.csv.flush_logs_every_n_steps=1",  # every step's loss reaches the file before a SIGKILL
    "callbacks=default",
    "~callbacks.dashboard",
    "ckpt_every_n_steps=3",
    "validate_before_fit=false",
    "save_model=true",
]
POLICIES = {
    "qtuning": ["pruner=qtuning", "budget=s50_t70"],
    "infobatch": ["pruner=combo", "pruner/sample=infobatch", "pruner/token=ppl", "budget=s50_t70"],
}


def run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "qtuning.train", *RUN, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """``key`` by logging step, over every CSV version the run directory holds (a resumed run adds one)."""
    values: dict[int, float] = {}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    values[int(row["step"])] = float(row[key])
    return values


def step_losses(run_dir: Path) -> dict[int, float]:
    return logged(run_dir, "train/loss")


def token_totals(run_dir: Path) -> dict[str, int]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: metrics[k] for k in TOKEN_TOTALS}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "hf_model" / "model.safetensors")


def signal_at(step: int, name: str) -> list[str]:
    return ["+callbacks.signal._target_=tests.signals.SignalAtStep", f"+callbacks.signal.step={step}",
            f"+callbacks.signal.signal_name={name}"]  # fmt: skip


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each policy's run that was never stopped, made once in the session."""

    def make(root: Path) -> None:
        for name, policy in POLICIES.items():
            result = run(root / name, *policy)
            assert result.returncode == 0, result.stderr[-3000:]

    root = made_once(tmp_path_factory, "uninterrupted", make)
    return {name: root / name for name in POLICIES}


def assert_same_run(resumed: Path, whole: Path, steps: int = 14) -> None:
    expected, got = step_losses(whole), step_losses(resumed)
    assert sorted(got) == sorted(expected) and len(expected) == steps
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=0, abs=1e-6), f"step {step}"
    reference = final_weights(whole)
    for name, tensor in final_weights(resumed).items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6)
    assert token_totals(resumed) == token_totals(whole)  # carried through the checkpoint, not restarted from 0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_token_totals_are_the_sums_of_the_logged_steps(uninterrupted, policy):
    """One micro-batch per optimizer step (accumulate_grad_batches=1), one device: each total is the sum of its
    per-step values in metrics.csv, over the 14 steps."""
    totals = token_totals(uninterrupted[policy])
    for key in ("train/loss_tokens", "prune/fwd_tokens", "prune/bwd_tokens"):
        steps = logged(uninterrupted[policy], key)
        assert len(steps) == 14 and all(v > 0 for v in steps.values()), key
        assert totals[f"{key}_total"] == sum(steps.values()), key


# Checkpoints every 3 steps; epoch 0 is steps 1-10. Killed at 8: back to step 6, inside epoch 0. Killed at 13: back
# to step 12, inside epoch 1, whose InfoBatch plan was made from scores that have moved since.
@pytest.mark.parametrize(("policy", "kill_step"), [("qtuning", 8), ("infobatch", 13)])  # within and across epochs
def test_sigkill_mid_epoch_then_resume_auto_is_exact(tmp_path, uninterrupted, policy, kill_step):
    killed = run(tmp_path, *POLICIES[policy], *signal_at(kill_step, "SIGKILL"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "metrics.json").exists()
    # killed at the end of step kill_step (logged as kill_step - 1), before that batch's log line was flushed
    assert max(step_losses(tmp_path)) == kill_step - 2
    resumed = run(tmp_path, *POLICIES[policy], "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: continuing from" in resumed.stdout + resumed.stderr
    assert_same_run(tmp_path, uninterrupted[policy])


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_preemption_saves_a_checkpoint_and_the_run_resumes(tmp_path, uninterrupted, signal_name):
    preempted = run(tmp_path, *POLICIES["qtuning"], *signal_at(5, signal_name))
    assert preempted.returncode == 0, preempted.stderr[-3000:]  # a clean exit, no traceback
    output = preempted.stdout + preempted.stderr
    assert "Traceback" not in output
    assert "saved" in output and "resume with resume=auto" in output
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 5  # the batch under way was finished, then the run stopped
    assert not (tmp_path / "metrics.json").exists()
    resumed = run(tmp_path, *POLICIES["qtuning"], "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path, uninterrupted["qtuning"])
