"""`BatchStats`: chunked fp32 NLL/entropy against a naive full-logits reference, and the per-sample aggregates."""

from __future__ import annotations

import math

import pytest
import torch

from qtuning import IGNORE_INDEX
from qtuning.pruning import BatchStats, shift_targets, token_losses


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


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_token_losses_match_torch_and_the_statistics(batch, chunk):
    _, labels, attention_mask = batch
    torch.manual_seed(1)
    hidden = torch.randn(3, 7, 5)
    head = torch.nn.Linear(5, 11, bias=False)
    ce = token_losses(hidden, head, 11, labels, attention_mask, chunk_size=chunk)
    _, response, _ = shift_targets(labels, attention_mask)
    logits = head(hidden)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(3, 6)
    torch.testing.assert_close(ce, expected * response)
    stats = BatchStats.from_logits(logits, labels, attention_mask)
    torch.testing.assert_close(ce, stats.token_nll)


def test_token_losses_only_where_counted_and_with_the_reference_gradient(batch):
    _, labels, attention_mask = batch
    torch.manual_seed(2)
    hidden = torch.randn(3, 7, 5, requires_grad=True)
    head = torch.nn.Linear(5, 11, bias=True)
    counted = torch.rand(3, 6) < 0.5
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    ce = token_losses(hidden, head, 11, labels, attention_mask, counted=counted, chunk_size=2)
    _, response, _ = shift_targets(labels, attention_mask)
    assert sum(calls) == int((counted & response).sum())  # the head ran at the counted response positions only
    ce.sum().backward()
    grads = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None
    logits = head(hidden)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].clamp(min=0).reshape(-1), reduction="none"
    ).view(3, 6)
    (expected * (counted & response)).sum().backward()
    for got, want in zip(grads, (hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_token_losses_with_nothing_counted_keep_every_parameter_in_the_graph(batch):
    _, labels, attention_mask = batch
    hidden = torch.randn(3, 7, 5, requires_grad=True)
    head = torch.nn.Linear(5, 11)
    ce = token_losses(hidden, head, 11, labels, attention_mask, counted=torch.zeros(3, 6, dtype=torch.bool))
    assert ce.abs().sum() == 0
    ce.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() == 0
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0
