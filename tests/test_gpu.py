"""On a CUDA device (marked ``gpu``; skipped elsewhere): the fused loss and the statistics under bf16/fp16 autocast
against fp32, and short training runs under ``bf16-mixed`` and ``16-mixed``. `scripts/gpu_check.sh` runs these."""

from __future__ import annotations

import math

import pytest
import torch

from qtuning.models import build_char_tokenizer, build_random_llama
from qtuning.ops import token_loss
from qtuning.ops.passes import output_head, scoring_forward
from qtuning.train import train
from tests.conftest import full_logits_cross_entropy
from tests.test_precision import batch_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def setting():
    tokenizer = build_char_tokenizer()
    model = build_random_llama(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, seed=3).cuda()
    rows = [("What is 2+2?", " It is 4."), ("Name a colour.", " Blue"), ("Hi", " Hello there, friend!")]
    batch = {k: v.cuda() for k, v in batch_of(tokenizer, rows).items()}
    return model, batch


@pytest.mark.parametrize("dtype", list(AUTOCAST))
def test_statistics_under_cuda_autocast_are_fp32_and_match_fp32(setting, dtype):
    model, batch = setting
    reference = scoring_forward(model, batch)
    with torch.autocast("cuda", dtype=AUTOCAST[dtype]):
        stats = scoring_forward(model, batch)
    assert stats.token_nll.dtype == stats.token_entropy.dtype == torch.float32
    torch.testing.assert_close(stats.token_nll, reference.token_nll, atol=0.05, rtol=0.01)
    torch.testing.assert_close(stats.token_entropy, reference.token_entropy, atol=0.05, rtol=0.01)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "checkpointed"])
@pytest.mark.parametrize("dtype", [None, *AUTOCAST], ids=["fp32", *AUTOCAST])
def test_token_loss_gradients_on_cuda_match_the_full_logits(setting, fused, dtype):
    model, batch = setting
    head = output_head(model)
    hidden = torch.randn(3, batch["input_ids"].shape[1], 64, device="cuda", requires_grad=True)
    context = torch.autocast("cuda", dtype=AUTOCAST[dtype]) if dtype else torch.autocast("cuda", enabled=False)
    with context:
        loss_sum, _ = token_loss(hidden, head, batch["labels"], batch["attention_mask"], fused=fused)
    loss_sum.backward()
    got = hidden.grad.clone(), head.module.weight.grad.clone()
    hidden.grad = head.module.weight.grad = None
    ce = full_logits_cross_entropy(head.module(hidden), batch["labels"], batch["attention_mask"])
    ce.sum().backward()
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype is None else {"rtol": 0.03, "atol": 0.01}
    torch.testing.assert_close(loss_sum, ce.sum(), **tolerance)
    for grad, want in zip(got, (hidden.grad, head.module.weight.grad), strict=True):
        torch.testing.assert_close(grad, want, **tolerance)
    model.zero_grad()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("pruner", ["qtuning", "none"])
def test_training_on_the_gpu(tiny_cfg, precision, pruner):
    cfg = tiny_cfg(f"pruner={pruner}", "trainer=gpu", f"trainer.precision={precision}", "trainer.max_steps=3")
    metrics, objects = train(cfg)
    assert objects["trainer"].precision == precision
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
