"""The paper's baselines end to end on the tiny model: every sample × token pruner trains, and InfoBatch resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from qtuning.models import build_model, build_tokenizer
from qtuning.train import train
from tests.conftest import ROOT, TINY_OVERRIDES, add_callbacks, compose_train

SAMPLE_PRUNERS = sorted(p.stem for p in (ROOT / "conf" / "pruner" / "sample").glob("*.yaml"))
TOKEN_PRUNERS = sorted(p.stem for p in (ROOT / "conf" / "pruner" / "token").glob("*.yaml"))


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model and its tokenizer saved as a Hugging Face directory: Rho-1's reference model."""
    path = tmp_path_factory.mktemp("reference")
    cfg = compose_train(TINY_OVERRIDES, path / "compose")
    tokenizer = build_tokenizer(cfg.model, "")
    build_model(cfg.model, "", vocab_size=len(tokenizer), seed=7).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("token", TOKEN_PRUNERS)
@pytest.mark.parametrize("sample", SAMPLE_PRUNERS)
def test_fast_dev_run_for_every_combination(tiny_cfg, reference_dir, sample, token):
    extra = [f"pruner.token.ref_model={reference_dir}"] if token == "rho1" else []
    # loss_norm=response: under the authors' nonpad, FastV's most-attended positions can all be prompt positions
    # (no loss there), which is a documented property, not a failure to train
    cfg = tiny_cfg(
        "pruner=combo", f"pruner/sample={sample}", f"pruner/token={token}", "pruner.token.loss_norm=response",
        "budget=s50_t70", "trainer.fast_dev_run=true", "~scheduler", *extra,
    )  # fmt: skip
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and metrics["train/loss"] > 0
    assert objects["trainer"].global_step == 1


class RecordPlans(Callback):
    """The InfoBatch plan each epoch trains on."""

    def __init__(self) -> None:
        self.plans: dict[int, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch, plan = pl_module.policy.sample_pruner.current
        assert epoch == trainer.current_epoch
        self.plans[epoch] = plan.indices.clone()


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_infobatch_resumes_with_the_same_scores_and_plans(tiny_cfg, tmp_path):
    run = [
        "pruner=combo", "pruner/sample=infobatch", "pruner/token=ppl", "budget=s50_t70",
        "trainer.max_steps=-1", "trainer.max_epochs=4", "callbacks=default", "~callbacks.dashboard",
        "callbacks.checkpoint.every_n_train_steps=null", "+callbacks.checkpoint.every_n_epochs=1",
    ]  # fmt: skip
    whole = RecordPlans()
    with pytest.MonkeyPatch.context() as mp:
        add_callbacks(mp, whole)
        _, uninterrupted = train(compose_train([*TINY_OVERRIDES, *run], tmp_path / "whole"))

    first_half = RecordPlans()
    with pytest.MonkeyPatch.context() as mp:
        add_callbacks(mp, first_half, StopAfterEpoch(1))
        train(tiny_cfg(*run))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    second_half = RecordPlans()
    with pytest.MonkeyPatch.context() as mp:
        add_callbacks(mp, second_half)
        _, resumed = train(tiny_cfg(*run, f"resume={ckpt}"))

    assert sorted(first_half.plans) == [0, 1] and sorted(second_half.plans) == [2, 3]
    assert whole.plans[0].numel() == 40  # epoch 0: nothing pruned
    assert any(plan.numel() < 40 for plan in whole.plans.values())  # later epochs are
    for epoch, plan in {**first_half.plans, **second_half.plans}.items():
        assert torch.equal(plan, whole.plans[epoch]), f"epoch {epoch}"
    torch.testing.assert_close(
        resumed["policy"].sample_pruner.scores, uninterrupted["policy"].sample_pruner.scores, rtol=0, atol=1e-6
    )
    assert resumed["trainer"].global_step == uninterrupted["trainer"].global_step
