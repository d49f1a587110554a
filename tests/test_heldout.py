"""Held-out metrics: the pure parts by hand, the scorer against a plain one-pair-at-a-time loop on a tiny model."""

from __future__ import annotations

import pytest
import torch

from experiments.heldout import heldout_metrics, matching_accuracy, response_logprobs, response_nll
from qtuning.data import encode_conversation
from qtuning.models import build_model, build_tokenizer


def test_response_nll_is_the_token_level_mean_over_every_pair():
    # −(−1 −2 −3 −6) / 4 = 3, not the mean of the per-pair means (2 and 6 → 4)
    assert response_nll([torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-6.0])]) == 3.0


def test_matching_accuracy_compares_mean_log_likelihoods_and_counts_ties_half():
    own = [torch.tensor([-1.0, -3.0]), torch.tensor([-2.0]), torch.tensor([-1.0, -1.0]), torch.tensor([-4.0])]
    # means: own -2, -2, -1, -4 against other -2.5 (win), -1 (loss), -1 (tie), -5 (win) → (1 + 0 + 0.5 + 1) / 4
    other = [torch.tensor([-2.5]), torch.tensor([-1.0, -1.0]), torch.tensor([-0.5, -1.5]), torch.tensor([-5.0])]
    assert matching_accuracy(own, other) == 0.625


def test_pure_metrics_refuse_empty_or_unequal_inputs():
    with pytest.raises(ValueError, match="no response tokens"):
        response_nll([torch.zeros(0)])
    with pytest.raises(ValueError, match="1 own and 2 other"):
        matching_accuracy([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)])


PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("Name three colours.", "Red, green and a rather longer blue one."),
    ("Say hi", "Hi there!"),
]


@pytest.fixture
def tiny(tiny_cfg):
    cfg = tiny_cfg()
    tokenizer = build_tokenizer(cfg.model, "")
    return build_model(cfg.model, "", vocab_size=len(tokenizer), seed=3), tokenizer


def reference_logprobs(model, tokenizer, prompt: str, response: str, max_length: int) -> torch.Tensor:
    """One pair, unpadded, through the full logits: log p of each labelled token."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    encoded = encode_conversation(tokenizer, messages, max_length)
    ids, labels = torch.tensor([encoded.input_ids]), torch.tensor(encoded.labels[1:])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()  # [T-1, V]
    log_probs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    return log_probs[labels != -100]


def test_scorer_equals_a_plain_loop_with_padding_and_batches(tiny):
    model, tokenizer = tiny
    model.train()
    scores = response_logprobs(model, tokenizer, PAIRS, max_length=256, batch_size=2)  # a padded batch, then one
    assert model.training  # the mode is given back
    for (prompt, response), got in zip(PAIRS, scores, strict=True):
        expected = reference_logprobs(model, tokenizer, prompt, response, 256)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_heldout_metrics_from_the_scorer(tiny):
    model, tokenizer = tiny
    matching = [(PAIRS[0][0], PAIRS[0][1], PAIRS[1][1]), (PAIRS[1][0], PAIRS[1][1], PAIRS[2][1])]
    metrics = heldout_metrics(model, tokenizer, PAIRS, matching, max_length=256)
    reference = [reference_logprobs(model, tokenizer, p, r, 256) for p, r in PAIRS]
    assert metrics["heldout/nll"] == pytest.approx(float(-torch.cat(reference).mean()), rel=1e-5)
    wins = [
        float(reference_logprobs(model, tokenizer, p, own, 256).mean())
        > float(reference_logprobs(model, tokenizer, p, other, 256).mean())
        for p, own, other in matching
    ]
    assert metrics["heldout/match_acc"] == sum(wins) / 2
    assert (metrics["heldout/n_pairs"], metrics["heldout/n_matching"]) == (3.0, 2.0)
