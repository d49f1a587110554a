"""The noise probe's keep-rate bookkeeping and verdict on hand-made inputs (no model); corruptions: test_corrupt."""

from __future__ import annotations

import pytest
import torch

from experiments import noise_probe


def test_keep_rates_count_each_kind():
    # 16 samples: kinds alternate clean/mismatched; constant scores, so the fill-up keeps the lowest indices of
    # every batch of 8: with r = 0.5, 4 per batch, i.e. half of each kind on average over random batchings.
    scores = {
        "ppl": torch.ones(16),
        "entropy": torch.ones(16),
        "entropy_response": torch.ones(16),
        "kind": torch.tensor([0, 1] * 8),
    }
    rates = noise_probe.keep_rates(scores, "minmax", 0.0, "nonpad", 8, 0.5, repeats=50, seed=0)
    # exactly 8 of the 16 kept in every batching, 8 of each kind seen: the two rates add up to 1
    assert rates["clean"] + rates["mismatched"] == pytest.approx(1.0)
    assert 0.3 < rates["clean"] < 0.7


def test_keep_rates_never_keep_what_the_guard_sets_aside():
    # One batch of all 16: the 4 mismatched samples carry the highest perplexity, and a guard of 1/4 sets 4 aside.
    scores = {
        "ppl": torch.tensor([1.0, 1, 1, 9] * 4),
        "entropy": torch.arange(16.0),
        "entropy_response": torch.arange(16.0),
        "kind": torch.tensor([0, 0, 0, 1] * 4),
    }
    rates = noise_probe.keep_rates(scores, "rank", 0.25, "nonpad", 16, 0.25, repeats=3, seed=0)
    assert rates["mismatched"] == 0.0
    assert rates["clean"] == pytest.approx(4 / 12)  # K = 4 of the 12 clean, every time


def rates_row(clean: float, mismatched: float) -> dict[str, float]:
    return {"clean": clean, "mismatched": mismatched, "typos": 0.1, "loop": 0.1}


def test_verdict_names_the_passing_variant_with_the_lowest_mismatched_ratio():
    rates = {}
    for b in noise_probe.BATCH_SIZES:
        for r in noise_probe.RATIOS:
            rates[b, r, "minmax", 0.0, "nonpad"] = rates_row(r, r)  # ratio 1: fails
            rates[b, r, "rank", 0.0, "nonpad"] = rates_row(r + 0.04, 0.4 * r)  # ratio ≈ 0.36: passes
            rates[b, r, "rank", 0.25, "nonpad"] = rates_row(r + 0.06, 0.1 * r)  # clean 6 points off: fails
    assert noise_probe.meets_target(rates, "rank", 0.0, "nonpad")
    assert not noise_probe.meets_target(rates, "rank", 0.25, "nonpad")
    text = "\n".join(noise_probe.verdict(rates))
    assert "**Best variant: `pruner.fill_up=rank pruner.ppl_guard=0.0`**" in text
    # mean ratios: mismatched 1; typos and loop (.1/.125 + .1/.25 + .1/.5) / 3 = 0.47
    assert "| minmax | 0.0 | nonpad | 1.00 | 0.47 | 0.47 | 1.00 / 1.00 | 25.0% / 50.0% | — |" in text
