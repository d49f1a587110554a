"""Held-out metrics: the pure parts by hand, the scorer against a plain one-pair-at-a-time loop on a tiny model."""

from __future__ import annotations

import math
import re

import pytest
import torch

from experiments.heldout import heldout_metrics, matching_accuracy, nearest_prompts, response_logprobs, response_nll
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


def plain_nearest(prompts: list[str]) -> list[int]:
    """TF-IDF cosine by hand: counts of lower-cased words of 2+ word characters, idf = ln((1 + N) / (1 + df)) + 1,
    each vector scaled to unit length; the most similar other prompt, the first of equal ones."""
    docs = [re.findall(r"\b\w\w+\b", prompt.lower()) for prompt in prompts]
    vocabulary = sorted({word for doc in docs for word in doc})
    n = len(docs)
    idf = {w: math.log((1 + n) / (1 + sum(w in doc for doc in docs))) + 1 for w in vocabulary}
    vectors = []
    for doc in docs:
        v = [doc.count(w) * idf[w] for w in vocabulary]
        norm = math.sqrt(sum(x * x for x in v))
        vectors.append([x / norm for x in v])
    nearest = []
    for i in range(n):
        best, best_cos = -1, -2.0
        for j in range(n):
            cos = sum(a * b for a, b in zip(vectors[i], vectors[j], strict=True))
            if j != i and cos > best_cos + 1e-12:
                best, best_cos = j, cos
        nearest.append(best)
    return nearest


def test_nearest_prompts_equal_a_plain_tf_idf_loop():
    prompts = [
        "How do I bake sourdough bread at home?",
        "Explain the Python GIL and threads.",
        "What flour is best to bake bread with?",
        "Python threads or asyncio for web scraping?",
        "Write a haiku about autumn leaves.",
        "Bake bread: bread, bread and more bread.",  # a repeated word weighs more
        "Is a haiku about leaves in autumn still a haiku?",
        "zz qq",  # no word shared with any other: its lowest-index other
    ]
    assert nearest_prompts(prompts) == plain_nearest(prompts)
    assert nearest_prompts(prompts)[:5] == [5, 3, 5, 1, 6] and nearest_prompts(prompts)[7] == 0  # by hand, too
    with pytest.raises(ValueError, match="at least two"):
        nearest_prompts(["only one"])


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
    hard = [(PAIRS[2][0], PAIRS[2][1], PAIRS[0][1]), *matching]
    metrics = heldout_metrics(model, tokenizer, PAIRS, matching, hard, max_length=256)
    reference = [reference_logprobs(model, tokenizer, p, r, 256) for p, r in PAIRS]
    assert metrics["heldout/nll"] == pytest.approx(float(-torch.cat(reference).mean()), rel=1e-5)
    wins = [
        float(reference_logprobs(model, tokenizer, p, own, 256).mean())
        > float(reference_logprobs(model, tokenizer, p, other, 256).mean())
        for p, own, other in hard
    ]
    assert metrics["heldout/match_acc"] == sum(wins[1:]) / 2
    assert metrics["heldout/match_hard_acc"] == pytest.approx(sum(wins) / 3)
    assert (metrics["heldout/n_pairs"], metrics["heldout/n_matching"], metrics["heldout/n_matching_hard"]) == (3, 2, 3)
