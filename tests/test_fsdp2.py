"""FSDP2 (``trainer=fsdp2_cpu``: two gloo processes, the model sharded per decoder layer) trains as DDP does
(``trainer=ddp_cpu``): on the tiny Llama in fp32, the same data, 4 rows per process, every path keeps the same rows,
logs the same loss at every step and ends with the same weights.

Every run of the module is made by one pair of processes (`tests.ranks`), one after the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qtuning.models import build_model, build_tokenizer
from tests.conftest import TINY_OVERRIDES, compose_train, made_once, run_on_two_ranks
from tests.test_resume import POLICIES, assert_same_run, run, signal_at
from tests.test_window import WINDOW, assert_same_steps, record, recorded

pytestmark = pytest.mark.slow  # runs of two processes

STEPS = ["trainer.max_steps=4", "validate_before_fit=false", "budget=s50_t70"]
PATHS = {
    "full": ["pruner=none"],
    "qtuning-separate-local": ["pruner=qtuning"],
    "qtuning-shared": ["pruner=qtuning", "pruner.scoring=shared"],
    "qtuning-global": ["pruner=qtuning", "pruner.threshold_scope=global"],
    "qtuning-window": ["pruner=qtuning", "data.batch_size=2", "trainer.accumulate_grad_batches=2", WINDOW],
    "infobatch-ppl": ["pruner=combo", "pruner/sample=infobatch", "pruner/token=ppl"],
    "qtuning-lora": ["pruner=qtuning", "model.lora.enabled=true"],
    # the paths that run pieces of the model outside its own training forward: FastV's and SparseVLM's attention
    # pass, Rho-1's reference model (unsharded, one copy per process)
    "fastv": ["pruner=combo", "pruner/token=fastv", "pruner.token.loss_norm=response"],
    "sparsevlm": ["pruner=combo", "pruner/token=sparsevlm", "pruner.token.loss_norm=response"],
    "rho1": ["pruner=combo", "pruner/token=rho1", "pruner.token.ref_model={reference}"],
}
TRAINERS = ("ddp_cpu", "fsdp2_cpu")


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every path under each trainer, made once in the session."""
    return made_once(tmp_path_factory, "fsdp2", run_every_path)


def run_every_path(root: Path) -> None:
    reference = root / "reference"  # Rho-1's reference model: a tiny model of another seed
    cfg = compose_train(TINY_OVERRIDES, reference / "compose")
    tokenizer = build_tokenizer(cfg.model, "")
    build_model(cfg.model, "", vocab_size=len(tokenizer), seed=7).save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    jobs = []
    for path, overrides in PATHS.items():
        for trainer in TRAINERS:
            run_dir = root / f"{path}-{trainer}"
            args = [o.format(reference=reference) for o in overrides]
            jobs.append((run_dir, [*TINY_OVERRIDES, *STEPS, f"trainer={trainer}", *args, *record(run_dir)]))
    run_on_two_ranks(jobs)


def recorded_run(run_dir: Path) -> dict:
    errors = sorted(run_dir.glob("error_rank*.txt"))
    assert not errors, errors[0].read_text()[-3000:]
    return recorded(run_dir, world=2)


@pytest.mark.xdist_group("fsdp2")  # on one worker, mostly: the runs are made once (made_once)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_fsdp2_trains_as_ddp(runs, path):
    ddp, fsdp2 = (recorded_run(runs / f"{path}-{trainer}") for trainer in TRAINERS)
    assert len(ddp["losses"]) == 4
    assert [r["sharded"] for r in fsdp2["per_rank"]] == [True, True]
    assert [r["sharded"] for r in ddp["per_rank"]] == [False, False]
    assert_same_steps(fsdp2, ddp)


def test_a_killed_fsdp2_run_resumes_from_its_sharded_checkpoint_exactly(tmp_path):
    """Q-Tuning under trainer=fsdp2_cpu for 10 steps (2 epochs of 5), both processes SIGKILLed at step 8 (back to the
    sharded checkpoint of step 6, a directory, in epoch 1), resumed with resume=auto: the same losses, weights
    (gathered into hf_model/) and token totals as the run that was never stopped."""
    sharded = [*POLICIES["qtuning"], "trainer=fsdp2_cpu", "trainer.max_steps=10"]
    whole = run(tmp_path / "whole", *sharded)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_dir = tmp_path / "killed"
    killed = run(killed_dir, *sharded, *signal_at(8, "SIGKILL"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (killed_dir / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # sharded: a directory
    resumed = run(killed_dir, *sharded, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: continuing from" in resumed.stdout + resumed.stderr
    assert_same_run(killed_dir, tmp_path / "whole", steps=10)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "hf_model")  # the gathered full weights
    for name, weight in load_file(tmp_path / "whole" / "hf_model" / "model.safetensors").items():
        torch.testing.assert_close(exported.state_dict()[name], weight, rtol=0, atol=0)
