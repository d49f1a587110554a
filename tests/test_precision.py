"""Statistics stay fp32 under every precision (autocast bf16/fp16, bf16 weights) and agree with an fp32 run; every
policy family trains under ``trainer.precision=bf16-mixed`` on CPU."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from lightning.pytorch import Callback

from qtuning.models import build_char_tokenizer, build_random_llama
from qtuning.ops.passes import scoring_forward
from qtuning.pruning.token_level import last_layer_pass, sparsevlm_scores
from qtuning.train import train
from tests.conftest import add_callbacks

PRECISIONS = {
    "autocast-bf16": (lambda: torch.autocast("cpu", dtype=torch.bfloat16), torch.float32),
    "autocast-fp16": (lambda: torch.autocast("cpu", dtype=torch.float16), torch.float32),
    "bf16-weights": (contextlib.nullcontext, torch.bfloat16),
}


def batch_of(tokenizer, rows: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded rows of (prompt, response) characters."""
    length = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for b, (prompt, response) in enumerate(rows):
        ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, len(prompt) : len(ids)] = torch.tensor(ids[len(prompt) :])
        attention_mask[b, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "sample_idx": torch.arange(3)}


@pytest.fixture(scope="module")
def setting():
    tokenizer = build_char_tokenizer()
    model = build_random_llama(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, seed=3).eval()
    rows = [("What is 2+2?", " It is 4."), ("Name a colour.", " Blue"), ("Hi", " Hello there, friend!")]
    return model, batch_of(tokenizer, rows)


def model_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if dtype == torch.float32:
        return model
    copy = build_random_llama(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=128, seed=3)
    return copy.to(dtype).eval()


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_scoring_statistics_are_fp32_and_match_fp32(setting, precision):
    model, batch = setting
    context, weights = PRECISIONS[precision]
    reference = scoring_forward(model, batch)
    with context():
        stats = scoring_forward(model_in(model, weights), batch)
    assert stats.token_nll.dtype == stats.token_entropy.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: logits of size ~1 are off by ~0.01, and so are NLL and entropy (nats)
    torch.testing.assert_close(stats.token_nll, reference.token_nll, atol=0.05, rtol=0.01)
    torch.testing.assert_close(stats.token_entropy, reference.token_entropy, atol=0.05, rtol=0.01)
    torch.testing.assert_close(stats.sample_ppl(), reference.sample_ppl(), atol=0.0, rtol=0.02)
    assert stats.response_mask.equal(reference.response_mask) and stats.nonpad_mask.equal(reference.nonpad_mask)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_token_pruner_scores_are_fp32_and_match_fp32(setting, precision):
    model, batch = setting
    context, weights = PRECISIONS[precision]
    received_32, hidden_32 = last_layer_pass(model, batch)
    with context():
        received, hidden = last_layer_pass(model_in(model, weights), batch)
        scores = sparsevlm_scores(received, hidden, batch["attention_mask"])
    assert received.dtype == hidden.dtype == scores.dtype == torch.float32
    torch.testing.assert_close(received, received_32, atol=0.01, rtol=0.02)
    scores_32 = sparsevlm_scores(received_32, hidden_32, batch["attention_mask"])
    torch.testing.assert_close(scores, scores_32, atol=0.02, rtol=0.05)


class RecordStats(Callback):
    """The dtypes of the statistics every training step decided from."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = outputs["stats"]
        for tensor in (stats.token_nll, stats.token_entropy, stats.ref_nll):
            if tensor is not None:
                self.dtypes.add(tensor.dtype)
        self.steps += 1


FAMILIES = {
    "qtuning-separate": ["pruner=qtuning"],
    "qtuning-shared": ["pruner=qtuning", "pruner.scoring=shared"],
    "qtuning-robust": ["pruner=qtuning_robust", "pruner.entropy_scope=response", "pruner.token_budget=per_sample"],
    "qtuning-global": ["pruner=qtuning", "pruner.threshold_scope=global"],
    "none": ["pruner=none"],
    "random_batch": ["pruner=random_batch"],
    "random-random": ["pruner=combo", "pruner/sample=random", "pruner/token=random"],
    # response candidates: with nonpad ones these two may keep only prompt positions (loss 0; see the README)
    "longest-fastv": ["pruner=combo", "pruner/sample=longest", "pruner/token=fastv", "pruner.token.loss_norm=response"],
    "shortest-sparsevlm": ["pruner=combo", "pruner/sample=shortest", "pruner/token=sparsevlm"],
    "entropy-ppl": ["pruner=combo", "pruner/sample=entropy", "pruner/token=ppl"],
    "infobatch-ppl-shared": [
        "pruner=combo",
        "pruner/sample=infobatch",
        "pruner/token=ppl",
        "pruner.token.scoring=shared",
    ],
    "none-rho1": ["pruner=combo", "pruner/sample=none", "pruner/token=rho1", "pruner.token.loss_norm=response"],
}
SCORED = {"qtuning-separate", "qtuning-shared", "qtuning-robust", "qtuning-global", "entropy-ppl"}
SCORED |= {"infobatch-ppl-shared", "none-rho1"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_policy_family_trains_under_bf16_mixed(tiny_cfg, tmp_path, family, monkeypatch):
    overrides = list(FAMILIES[family])
    if family == "none-rho1":  # the reference: a tiny model saved with the training tokenizer
        tokenizer = build_char_tokenizer()
        build_random_llama(vocab_size=len(tokenizer), seed=9).save_pretrained(tmp_path / "ref")
        tokenizer.save_pretrained(tmp_path / "ref")
        overrides.append(f"pruner.token.ref_model={tmp_path / 'ref'}")
    cfg = tiny_cfg(*overrides, "budget=s50_t70", "trainer.precision=bf16-mixed", "trainer.max_steps=-1",
                   "trainer.max_epochs=2", "data.batch_size=8", "~scheduler")  # fmt: skip
    recorder = RecordStats()
    add_callbacks(monkeypatch, recorder)
    metrics, objects = train(cfg)
    assert objects["trainer"].precision == "bf16-mixed"
    assert recorder.steps >= 2 and math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    assert math.isfinite(metrics["val/loss"])
    assert recorder.dtypes == ({torch.float32} if family in SCORED else set())
