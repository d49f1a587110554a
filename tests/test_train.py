"""End-to-end training on the tiny model: exact gradients, accumulation, policies, resume, and the CLI's errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from qtuning.models import build_model, build_tokenizer
from qtuning.ops import select_rows
from qtuning.pruning import BatchStats
from qtuning.train import train
from tests.conftest import ROOT, TINY_OVERRIDES, add_callbacks, full_logits_cross_entropy

# SGD with lr 1 and no clipping: the parameter change of one step is exactly minus the gradient.
PLAIN_SGD = [
    "optimizer._target_=torch.optim.SGD",
    "optimizer.lr=1.0",
    "~optimizer.weight_decay",
    "~scheduler",
    "trainer.gradient_clip_val=null",
    "validate_before_fit=false",
]


def test_select_rows_trims_to_the_kept_rows_longest_sequence():
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, 2, 3, 4], [-100, 6, -100, -100], [-100, 8, 9, -100]]),
        "sample_idx": torch.tensor([10, 11, 12]),
    }
    kept = select_rows(batch, torch.tensor([1, 2]))
    assert kept["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert kept["labels"].tolist() == [[-100, 6, -100], [-100, 8, 9]]
    assert kept["sample_idx"].tolist() == [11, 12]


def reference_gradient(cfg, n_batches: int) -> dict[str, torch.Tensor]:
    """Σ ce·w / Σ w over the first n batches, by a full-batch forward with dropped rows masked out."""
    tokenizer = build_tokenizer(cfg.model, cfg.paths.cache_dir)
    model = build_model(cfg.model, cfg.paths.cache_dir, vocab_size=len(tokenizer), seed=cfg.seed)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    policy = instantiate(cfg.pruner)
    loss_sum, tokens = 0.0, 0.0
    for _, batch in zip(range(n_batches), datamodule.train_dataloader(), strict=False):
        decision = policy.select(BatchStats.from_masks(batch["labels"], batch["attention_mask"]))
        ce = full_logits_cross_entropy(
            model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
            batch["attention_mask"],
        )
        loss_sum = loss_sum + (ce * decision.token_keep).sum()
        tokens += float(decision.token_keep.sum())
    (loss_sum / tokens).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("overrides", "n_batches"),
    [
        (["pruner=none"], 1),
        (["pruner=random_batch", "budget=s50_t70"], 1),
        # Two micro-batches of different token counts: the loss is normalised over both, not averaged per batch.
        (["pruner=random_batch", "budget=s50_t70", "trainer.accumulate_grad_batches=2"], 2),
    ],
    ids=["none", "random", "random-accumulate2"],
)
def test_one_step_applies_the_exact_token_normalised_gradient(tiny_cfg, overrides, n_batches):
    cfg = tiny_cfg(*PLAIN_SGD, *overrides, "trainer.max_steps=1", "data.val_size=0")
    expected = reference_gradient(cfg, n_batches)
    before = {k: v.clone() for k, v in build_model(cfg.model, "", vocab_size=104, seed=cfg.seed).named_parameters()}
    _, objects = train(cfg)
    after = dict(objects["module"].model.named_parameters())
    for name, grad in expected.items():
        torch.testing.assert_close(before[name] - after[name].detach(), grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pruner", sorted(p.stem for p in (ROOT / "conf" / "pruner").glob("*.yaml")))
def test_fast_dev_run_for_each_policy(tiny_cfg, pruner):
    # No warm-up schedule here: its first step has lr 0.
    cfg = tiny_cfg(f"pruner={pruner}", "budget=s50_t70", "trainer.fast_dev_run=true", "~scheduler")
    before = [p.clone() for p in build_model(cfg.model, "", vocab_size=104, seed=cfg.seed).parameters()]
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["train/loss"] > 0
    changed = [not torch.equal(a, b) for a, b in zip(before, objects["module"].model.parameters(), strict=True)]
    assert all(changed)


@pytest.mark.parametrize(
    "pruner",
    [["pruner=none"], ["pruner=combo", "pruner/sample=infobatch", "pruner/token=random"]],
    ids=["none", "infobatch"],
)
def test_the_schedule_ends_where_the_run_does(tiny_cfg, pruner):
    # 40 training rows in batches of 4, 2 per optimizer step, 3 epochs: 30 steps for pruner=none; InfoBatch's
    # epochs after the first are shorter and known only when they start.
    cfg = tiny_cfg(*pruner, "budget=s50_t70", "trainer.max_steps=-1", "trainer.max_epochs=3")
    cfg.trainer.accumulate_grad_batches = 2
    _, objects = train(cfg)
    steps = objects["trainer"].global_step
    if pruner == ["pruner=none"]:
        assert steps == 3 * 5
    scheduler = objects["trainer"].lr_scheduler_configs[0].scheduler
    assert objects["module"].total_steps == scheduler.total_steps == steps


def test_validation_loss_and_metrics_file(tiny_cfg, tmp_path):
    cfg = tiny_cfg("pruner=none", "trainer.max_steps=4", "optimizer.lr=0.01")
    metrics, _ = train(cfg)
    assert metrics["val/loss"] < metrics["val/loss_start"]
    assert metrics["val/ppl"] == pytest.approx(torch.exp(torch.tensor(metrics["val/loss"])).item(), rel=1e-5)
    assert (tmp_path / "metrics.json").exists()


def test_max_steps_zero_is_a_run_that_trains_nothing(tiny_cfg):
    """Lightning's reading of ``trainer.max_steps=0``: a valid run, validated, saved, with its weights untouched."""
    cfg = tiny_cfg("pruner=qtuning", "trainer.max_steps=0")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 0 and objects["module"].total_steps == 0
    assert metrics["val/loss"] == metrics["val/loss_start"]


def test_no_validation_split_means_no_validation_and_no_warning(tiny_cfg, recwarn):
    cfg = tiny_cfg("pruner=none", "trainer.max_steps=2", "trainer.val_check_interval=1", "data.val_size=0")
    metrics, objects = train(cfg)
    assert "val/loss" not in metrics and "val/loss_start" not in metrics
    assert objects["trainer"].global_step == 2
    assert not [w for w in recwarn if "across ranks is zero" in str(w.message)]


def test_resume_restores_the_policy_state(tiny_cfg, tmp_path):
    from lightning.pytorch import Callback

    checkpointing = [
        "callbacks=default",
        "callbacks.checkpoint.every_n_train_steps=2",
        "trainer.enable_progress_bar=false",
    ]
    first_cfg = tiny_cfg("pruner=random_batch", "budget=s25_t50", "trainer.max_steps=2", *checkpointing)
    _, first = train(first_cfg)
    saved_state = first["policy"].state_dict()["generator"]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.exists()

    seen: dict[str, torch.Tensor] = {}

    class RecordPolicyState(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["state"] = pl_module.policy.generator.get_state()

    resumed_cfg = tiny_cfg(
        "pruner=random_batch", "budget=s25_t50", "trainer.max_steps=4", f"resume={ckpt}", *checkpointing
    )
    with pytest.MonkeyPatch.context() as mp:
        add_callbacks(mp, RecordPolicyState())
        _, resumed = train(resumed_cfg)
    fresh_state = torch.Generator().manual_seed(resumed_cfg.seed).get_state()
    assert torch.equal(seen["state"], saved_state)
    assert not torch.equal(saved_state, fresh_state)
    assert resumed["trainer"].global_step == 4


@pytest.mark.slow
def test_multirun_gives_one_wandb_run_per_job_in_one_group(tmp_path):
    from qtuning.loggers import offline_history_keys, read_offline_run

    sweep_dir = tmp_path / "sweep"
    args = [a for a in TINY_OVERRIDES if not a.startswith("logger=")]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qtuning.train",
            "-m",
            *args,
            "pruner=none,random",
            "budget=s25_t50,s50_t70",
            "trainer.max_steps=2",
            "logger=wandb",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 4
    identities = [
        (r.run.run_group, r.run.display_name, r.run.run_id)
        for run_file in runs
        for r in read_offline_run(run_file)
        if r.WhichOneof("record_type") == "run"
    ]
    logged_keys = set().union(*(offline_history_keys(run_file) for run_file in runs))
    assert len(identities) == 4
    assert {group for group, _, _ in identities} == {sweep_dir.name}
    assert len({name for _, name, _ in identities}) == 4 and len({rid for _, _, rid in identities}) == 4
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/loss", "prune/kept_samples"} <= logged_keys


def test_lora_checkpoint_holds_only_the_adapter_and_resumes(tiny_cfg, tmp_path):
    lora = ["model.lora.enabled=true", "model.lora.target_modules=[q_proj,v_proj]", "callbacks=default"]
    _, first = train(tiny_cfg(*lora, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2"))
    ckpt_file = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt_file, weights_only=False)["state_dict"]
    assert saved and all("lora_" in key for key in saved)
    trained = {k: v.detach().clone() for k, v in first["module"].state_dict().items() if k in saved}
    _, resumed = train(tiny_cfg(*lora, "trainer.max_steps=2", f"resume={ckpt_file}"))
    state = resumed["module"].state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    assert resumed["trainer"].global_step == 2


def test_a_step_that_keeps_nothing_contributes_zero(tiny_cfg):
    cfg = tiny_cfg(*PLAIN_SGD, "pruner=none", "pruner._target_=tests.signals.KeepNothing", "trainer.max_steps=2")
    before = {k: v.clone() for k, v in build_model(cfg.model, "", vocab_size=104, seed=cfg.seed).named_parameters()}
    metrics, objects = train(cfg)
    assert metrics["train/loss"] == 0.0 and metrics["train/loss_tokens"] == 0.0
    for name, param in objects["module"].model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name  # no NaN, no change


def test_non_finite_losses_are_skipped_and_counted(tiny_cfg):
    cfg = tiny_cfg(
        "pruner=none", "pruner._target_=tests.signals.NonFiniteFirst", "+pruner.bad=2", "trainer.max_steps=3"
    )
    metrics, objects = train(cfg)
    assert objects["module"].bad_steps == 2 and metrics["train/nonfinite_skipped"] == 2.0
    # Lightning still counts a skipped micro-batch as an (empty) optimizer step: no gradient, no change
    assert objects["trainer"].global_step == 3
    assert all(torch.isfinite(p).all() for p in objects["module"].model.parameters())


def test_too_many_non_finite_losses_in_a_row_stop_with_a_checkpoint(tiny_cfg, tmp_path):
    from qtuning.resume import NonFiniteLossError

    cfg = tiny_cfg("pruner=none", "pruner._target_=tests.signals.NonFiniteFirst", "+pruner.bad=100", "max_bad_steps=3")
    with pytest.raises(NonFiniteLossError, match=r"max_bad_steps=3: 3 micro-batches in a row"):
        train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    initial = build_model(cfg.model, "", vocab_size=104, seed=cfg.seed).state_dict()
    for name, value in initial.items():  # nothing finite was ever applied: the saved weights are the initial ones
        torch.testing.assert_close(checkpoint["state_dict"][f"model.{name}"], value)


def test_the_response_token_total_counts_what_the_loss_learns_from(tiny_cfg):
    # One epoch over every training sample, the loss divided by response tokens (pruner=none) or by every non-pad
    # position, prompt included (a nonpad token pruner that keeps everything): the same response tokens learnt from.
    epoch = ["trainer.max_steps=-1", "trainer.max_epochs=1", "validate_before_fit=false"]
    full, objects = train(tiny_cfg("pruner=none", *epoch))
    nonpad, _ = train(tiny_cfg("pruner=combo", "pruner/sample=none", "pruner/token=none", *epoch))
    examples = objects["datamodule"].train_examples
    response = int(objects["datamodule"].sample_info().response_tokens.sum())  # targets after the shift
    positions = sum(len(e.input_ids) - 1 for e in examples)  # every non-pad target position
    assert full["train/response_tokens_total"] == full["train/loss_tokens_total"] == response
    assert nonpad["train/response_tokens_total"] == response
    assert nonpad["train/loss_tokens_total"] == positions > response
