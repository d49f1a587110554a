"""Held-out metrics of a trained model that no pruning decision touches: every response token of clean held-out pairs
is scored, and the matching accuracy compares whole responses, so dropping tokens in training cannot game it.

- response NLL per token: ``Σ −log p`` over all response tokens of all held-out pairs ÷ their number;
- matching accuracy: over fixed (prompt, own response, other response) triples, the share in which the prompt's own
  response gets the higher mean log-likelihood per token (a tie counts half). The hard-negative variant takes the other
  response from the pair whose prompt is most like this one (TF-IDF cosine, `nearest_prompts`): the same topic, so
  the model must tell this answer from a near miss, not from another subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from qtuning.data import Example, collate, encode_conversation
from qtuning.errors import QTuningError
from qtuning.ops.passes import scoring_forward


def response_nll(token_logprobs: Sequence[Tensor]) -> float:
    """The token-level mean NLL over every response token of every pair (``[n_i]`` fp32 log-probabilities each)."""
    total = sum(float(lp.sum()) for lp in token_logprobs)
    count = sum(lp.numel() for lp in token_logprobs)
    if count == 0:
        raise ValueError("no response tokens to score")
    return -total / count


def matching_accuracy(own: Sequence[Tensor], other: Sequence[Tensor]) -> float:
    """The share of pairs whose own response has the higher mean log-likelihood per token (``[n_i]`` each); ties
    count half."""
    if len(own) != len(other) or not own:
        raise ValueError(f"{len(own)} own and {len(other)} other responses: need as many, at least one")
    wins = 0.0
    for a, b in zip(own, other, strict=True):
        mean_a, mean_b = float(a.mean()), float(b.mean())
        wins += 1.0 if mean_a > mean_b else 0.5 if mean_a == mean_b else 0.0
    return wins / len(own)


def nearest_prompts(prompts: Sequence[str]) -> list[int]:
    """For each prompt, the index of the most similar other prompt by TF-IDF cosine (scikit-learn's defaults: lower
    case, words of two or more characters, smoothed idf, l2-normalised rows); ties go to the lower index, and a prompt
    with no word in common with any other gets its lowest-index other."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(prompts) < 2:
        raise ValueError(f"{len(prompts)} prompt(s): a nearest other prompt needs at least two")
    vectors = TfidfVectorizer().fit_transform(prompts)  # [N, words], sparse, rows of unit length
    similarity = torch.from_numpy((vectors @ vectors.T).toarray())  # [N, N] cosine
    similarity.fill_diagonal_(-1.0)  # never itself
    return [int(i) for i in similarity.argmax(dim=1)]  # argmax: the first of equal maxima


def response_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    batch_size: int = 8,
) -> list[Tensor]:
    """``[n_i]`` fp32 log-probabilities of each pair's response tokens (the chat template's turn end included, as in
    training), from the model in eval mode; pairs longer than ``max_length`` are cut as in training."""
    examples = []
    for i, (prompt, response) in enumerate(pairs):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        encoded = encode_conversation(tokenizer, messages, max_length, f"pair {i}")
        examples.append(Example(encoded.input_ids, encoded.labels, f"pair {i}"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    scores: list[Tensor] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, list(range(start, start + len(chunk))), pad_id)
            stats = scoring_forward(model, batch)  # token_nll [B, T-1] fp32, 0 off the response
            for row in range(len(chunk)):
                mask = stats.response_mask[row]  # [T-1]
                if not mask.any():
                    raise QTuningError(f"pair {start + row}: no response token within max_length={max_length}")
                scores.append(-stats.token_nll[row][mask])
    finally:
        model.train(was_training)
    return scores


def heldout_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    heldout: Sequence[tuple[str, str]],
    matching: Sequence[tuple[str, str, str]],
    hard_matching: Sequence[tuple[str, str, str]],
    max_length: int,
    batch_size: int = 8,
) -> dict[str, float]:
    """``heldout/nll`` over the ``(prompt, response)`` pairs, ``heldout/match_acc`` over the ``(prompt, own, other)``
    triples and ``heldout/match_hard_acc`` over the hard-negative ones, with their sizes. Each distinct pair is scored
    once: a triple's own pair is usually a held-out pair already."""
    triples = [*matching, *hard_matching]
    pairs = list(dict.fromkeys([*heldout, *((p, o) for p, o, _ in triples), *((p, x) for p, _, x in triples)]))
    scores = dict(zip(pairs, response_logprobs(model, tokenizer, pairs, max_length, batch_size), strict=True))

    def accuracy(of: Sequence[tuple[str, str, str]]) -> float:
        return matching_accuracy([scores[p, o] for p, o, _ in of], [scores[p, x] for p, _, x in of])

    return {
        "heldout/nll": response_nll([scores[pair] for pair in heldout]),
        "heldout/match_acc": accuracy(matching),
        "heldout/match_hard_acc": accuracy(hard_matching),
        "heldout/n_pairs": float(len(heldout)),
        "heldout/n_matching": float(len(matching)),
        "heldout/n_matching_hard": float(len(hard_matching)),
    }
