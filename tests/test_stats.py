"""`BatchStats`: chunked fp32 NLL/entropy against a naive full-logits reference, and the per-sample aggregates."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from qtuning import IGNORE_INDEX
from qtuning.ops import BatchStats, OutputHead, shift_targets, token_loss


def naive_stats(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
    """Reference: full fp64 softmax, loops over positions, no chunking."""
    batch, length, _ = logits.shape
    nll = torch.zeros(batch, length - 1, dtype=torch.float64)
    ent = torch.zeros(batch, length - 1, dtype=torch.float64)
    for b in range(batch):
        for i in range(length - 1):
            p = torch.softmax(logits[b, i].double(), -1)
            if attention_mask[b, i + 1]:
                ent[b, i] = -(p * p.log()).sum()
                if labels[b, i + 1] != IGNORE_INDEX:
                    nll[b, i] = -p[labels[b, i + 1]].log()
    return nll, ent


@pytest.fixture
def batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = IGNORE_INDEX  # a 3-token prompt
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0  # row 1 is right-padded
    labels[1, 5:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # row 2 has no response at all
    return logits, labels, attention_mask


def test_shift_targets_masks(batch):
    _, labels, attention_mask = batch
    targets, response, nonpad = shift_targets(labels, attention_mask)
    assert targets.shape == (3, 6)
    assert response[0].tolist() == [False, False, True, True, True, True]
    assert response[1].tolist() == [False, False, True, True, False, False]
    assert nonpad[1].tolist() == [True, True, True, True, False, False]
    assert not response[2].any()


def test_from_logits_matches_naive_reference(batch):
    logits, labels, attention_mask = batch
    stats = BatchStats.from_logits(logits, labels, attention_mask)
    nll, ent = naive_stats(logits, labels, attention_mask)
    assert stats.token_nll.dtype == torch.float32
    torch.testing.assert_close(stats.token_nll.double(), nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.token_entropy.double(), ent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_chunked_equals_unchunked(batch, chunk):
    logits, labels, attention_mask = batch
    whole = BatchStats.from_logits(logits, labels, attention_mask, chunk_size=logits.shape[1])
    chunked = BatchStats.from_logits(logits, labels, attention_mask, chunk_size=chunk)
    assert torch.equal(whole.token_nll, chunked.token_nll)
    assert torch.equal(whole.token_entropy, chunked.token_entropy)


def test_from_hidden_states_equals_from_logits(batch):
    _, labels, attention_mask = batch
    torch.manual_seed(1)
    hidden = torch.randn(3, 7, 5)
    head = torch.nn.Linear(5, 11, bias=False)
    from_hidden = BatchStats.from_hidden_states(hidden, head, 11, labels, attention_mask, chunk_size=2)
    from_logits = BatchStats.from_logits(head(hidden), labels, attention_mask)
    torch.testing.assert_close(from_hidden.token_nll, from_logits.token_nll)
    torch.testing.assert_close(from_hidden.token_entropy, from_logits.token_entropy)


def test_bf16_logits_give_fp32_statistics(batch):
    logits, labels, attention_mask = batch
    stats = BatchStats.from_logits(logits.bfloat16(), labels, attention_mask)
    nll, _ = naive_stats(logits.bfloat16().float(), labels, attention_mask)
    assert stats.token_nll.dtype == torch.float32
    torch.testing.assert_close(stats.token_nll.double(), nll, atol=1e-5, rtol=0)


def test_all_masked_row_gives_finite_aggregates(batch):
    logits, labels, attention_mask = batch
    stats = BatchStats.from_logits(logits, labels, attention_mask)
    ppl, ent = stats.sample_ppl(), stats.sample_entropy()
    assert torch.isfinite(ppl).all() and torch.isfinite(ent).all()
    assert ppl[2] == 1.0  # exp(0 / max(1, 0)): no response tokens


def test_sample_aggregates_by_hand():
    response = torch.tensor([[False, True, True, False]])
    nonpad = torch.tensor([[True, True, True, False]])
    stats = BatchStats(
        response_mask=response,
        nonpad_mask=nonpad,
        token_nll=torch.tensor([[0.0, 1.0, 3.0, 0.0]]),
        token_entropy=torch.tensor([[0.5, 1.0, 2.0, 0.0]]),
    )
    assert stats.sample_ppl().item() == pytest.approx(math.exp(2.0))
    assert stats.sample_entropy("nonpad").item() == pytest.approx(3.5 / 3)
    assert stats.sample_entropy("response").item() == pytest.approx(1.5)


def reference_loss(hidden, head, labels, attention_mask, weight):
    """Σ ce·w from the full logits, the plain way."""
    logits = head(hidden)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(weight.shape)  # fmt: skip
    return (ce * weight).sum(), ce


FUSED = [True, False]


@pytest.mark.parametrize("fused", FUSED, ids=["fused", "checkpointed"])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_token_loss_matches_torch_and_the_statistics(batch, chunk, fused):
    _, labels, attention_mask = batch
    torch.manual_seed(1)
    hidden = torch.randn(3, 7, 5)
    head = OutputHead(torch.nn.Linear(5, 11, bias=False), 11)
    _, response, _ = shift_targets(labels, attention_mask)
    loss_sum, ce = token_loss(hidden, head, labels, attention_mask, chunk_size=chunk, fused=fused)
    expected_sum, expected = reference_loss(hidden, head, labels, attention_mask, response.float())
    torch.testing.assert_close(ce, expected * response)
    torch.testing.assert_close(loss_sum, expected_sum)
    stats = BatchStats.from_logits(head(hidden), labels, attention_mask)
    torch.testing.assert_close(ce, stats.token_nll)


@pytest.mark.parametrize("fused", FUSED, ids=["fused", "checkpointed"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_token_loss_runs_the_head_where_weighted_with_the_reference_gradient(batch, fused, autocast):
    _, labels, attention_mask = batch
    torch.manual_seed(2)
    hidden = torch.randn(3, 7, 5, requires_grad=True)
    module = torch.nn.Linear(5, 11, bias=True)
    head = OutputHead(module, 11)
    weight = (torch.rand(3, 6) < 0.6) * torch.rand(3, 6) * 3  # some positions 0, the others weighted
    _, response, _ = shift_targets(labels, attention_mask)
    calls = []
    hook = module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        loss_sum, ce = token_loss(hidden, head, labels, attention_mask, weight=weight, chunk_size=2, fused=fused)
    assert loss_sum.dtype == ce.dtype == torch.float32 and not ce.requires_grad
    loss_sum.backward()
    hook.remove()
    # the head ran only at the weighted response positions: fused once, checkpointed twice (forward and recompute)
    assert sum(calls) == (0 if fused else 2 * int(((weight != 0) & response).sum()))
    grads = (hidden.grad.clone(), module.weight.grad.clone(), module.bias.grad.clone())
    hidden.grad = module.weight.grad = module.bias.grad = None
    with context:
        expected_sum, _ = reference_loss(hidden, head, labels.clamp(min=0), attention_mask, weight * response)
    expected_sum.backward()
    tolerance = {"rtol": 0.02, "atol": 0.02} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(loss_sum, expected_sum.float(), **tolerance)
    for got, want in zip(grads, (hidden.grad, module.weight.grad, module.bias.grad), strict=True):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("fused", FUSED, ids=["fused", "checkpointed"])
def test_token_loss_with_nothing_weighted_keeps_every_parameter_in_the_graph(batch, fused):
    _, labels, attention_mask = batch
    hidden = torch.randn(3, 7, 5, requires_grad=True)
    module = torch.nn.Linear(5, 11)
    loss_sum, ce = token_loss(hidden, OutputHead(module, 11), labels, attention_mask, torch.zeros(3, 6), fused=fused)
    assert loss_sum == 0 and ce.abs().sum() == 0
    loss_sum.backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() == 0
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_token_loss_applies_a_final_logit_softcap(batch):
    _, labels, attention_mask = batch
    hidden = torch.randn(3, 7, 5) * 10
    module = torch.nn.Linear(5, 11)
    head = OutputHead(module, 11, softcap=2.0)
    assert head.plain_linear() is None  # soft-capped: never the fused way
    _, ce = token_loss(hidden, head, labels, attention_mask)
    capped = 2.0 * torch.tanh(module(hidden) / 2.0)
    torch.testing.assert_close(ce, BatchStats.from_logits(capped, labels, attention_mask).token_nll)
