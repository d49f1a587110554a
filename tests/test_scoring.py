"""The two ways to pay for Q-Tuning's scores give the same gradients; the scoring pass equals full-logit statistics."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from qtuning.models import build_model, build_tokenizer
from qtuning.module import SFTModule
from qtuning.ops import scoring_forward
from qtuning.ops.passes import output_head
from qtuning.pruning import BatchStats
from tests.conftest import full_logits_cross_entropy


def build_module(cfg, scoring: str) -> tuple[SFTModule, object]:
    tokenizer = build_tokenizer(cfg.model, "")
    model = build_model(cfg.model, "", vocab_size=len(tokenizer), seed=cfg.seed)
    policy = instantiate(cfg.pruner, scoring=scoring)
    return SFTModule(model, policy, optimizer=torch.optim.SGD), tokenizer


def first_batches(cfg, tokenizer, n: int) -> list[dict]:
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    return [b for _, b in zip(range(n), datamodule.train_dataloader(), strict=False)]


def grads_of(module: SFTModule, batch: dict) -> dict[str, torch.Tensor]:
    module.model.zero_grad()
    scored = module.score(batch)
    decision = module.decide(scored.stats)
    (trained,) = module.train_kept(batch, scored, decision, batch_idx=0)  # a window of one micro-batch: one pass
    (trained.loss_sum / trained.weight.sum().clamp(min=1)).backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}, decision


def test_separate_and_shared_give_the_same_gradient(tiny_cfg):
    # Batches of 8 rows with different lengths (right padding); Q-Tuning at 25% samples x 50% tokens.
    cfg = tiny_cfg("pruner=qtuning", "budget=s25_t50", "data.batch_size=8", "data.val_size=0")
    separate, tokenizer = build_module(cfg, "separate")
    shared, _ = build_module(cfg, "shared")
    for batch in first_batches(cfg, tokenizer, 3):
        assert (batch["attention_mask"].sum(1) < batch["attention_mask"].shape[1]).any()  # padded rows exist
        g_sep, d_sep = grads_of(separate, batch)
        g_sha, d_sha = grads_of(shared, batch)
        assert torch.equal(d_sep.sample_keep, d_sha.sample_keep) and torch.equal(d_sep.token_keep, d_sha.token_keep)
        assert int(d_sep.sample_keep.sum()) < batch["input_ids"].shape[0]  # something was really dropped
        for name, grad in g_sha.items():
            rel = (g_sep[name] - grad).norm() / grad.norm().clamp(min=1e-12)
            assert rel < 1e-4, (name, float(rel))


def test_scoring_pass_equals_statistics_from_full_logits(tiny_cfg):
    cfg = tiny_cfg("pruner=qtuning", "budget=s25_t50", "data.batch_size=8", "data.val_size=0")
    module, tokenizer = build_module(cfg, "separate")
    batch = first_batches(cfg, tokenizer, 1)[0]
    chunked = scoring_forward(module.model, batch)
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = BatchStats.from_logits(logits, batch["labels"], batch["attention_mask"], chunk_size=10**6)
    torch.testing.assert_close(chunked.token_nll, full.token_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.token_entropy, full.token_entropy, rtol=1e-5, atol=1e-5)


def reference_gradients(model, batch: dict, token_keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ ce·w / Σ w from the full [B, T, V] logits of the whole batch, w the decision's positions."""
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = full_logits_cross_entropy(logits, batch["labels"], batch["attention_mask"])
    ((ce * token_keep).sum() / token_keep.sum().clamp(min=1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
# LoRA on the layers leaves the head a plain frozen nn.Linear (the fused loss); on the head too, it is peft's wrapper
# (the checkpointed loss).
@pytest.mark.parametrize("lora", [None, "layers", "layers+head"], ids=["full", "lora", "lora-on-head"])
@pytest.mark.parametrize(("pruner", "scoring"), [("qtuning", "separate"), ("qtuning", "shared"), ("none", None)])
def test_chunked_loss_gradients_equal_the_full_logits_path(tiny_cfg, pruner, lora, tied, scoring):
    overrides = [f"pruner={pruner}", "budget=s25_t50", "data.batch_size=8", "data.val_size=0"]
    overrides += [f"model.architecture.tie_word_embeddings={tied}", f"model.lora.enabled={lora is not None}"]
    if lora == "layers+head":
        overrides.append("model.lora.target_modules=[q_proj,v_proj,lm_head]")
    cfg = tiny_cfg(*overrides)
    tokenizer = build_tokenizer(cfg.model, "")
    model = build_model(cfg.model, "", vocab_size=len(tokenizer), seed=cfg.seed)
    assert (output_head(model).plain_linear() is None) == (lora == "layers+head")
    if lora:  # B starts at zero, which would leave A's gradient zero: give both a value
        for name, param in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.1)
    policy = instantiate(cfg.pruner, scoring=scoring) if scoring else instantiate(cfg.pruner)
    module = SFTModule(model, policy, optimizer=torch.optim.SGD)
    for batch in first_batches(cfg, tokenizer, 2):
        got, decision = grads_of(module, batch)
        expected = reference_gradients(model, batch, decision.token_keep)
        assert set(got) == set(expected) and expected
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5, msg=name)
