"""The noise probe's corruptions and its keep-rate bookkeeping, on hand-made inputs (no model)."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("noise_probe", ROOT / "scripts" / "noise_probe.py")
noise_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(noise_probe)


def test_loop_repeats_the_first_sentence_to_the_length():
    text = "Paris is the capital. It has many museums and a tower."
    assert noise_probe.loop(text) == "Paris is the capital. Paris is the capital."


def test_typos_damage_about_a_quarter_of_the_longer_words():
    text = " ".join(["wonderful"] * 400)
    damaged = noise_probe.typos(text, random.Random(0)).split(" ")
    changed = sum(w != "wonderful" for w in damaged)
    assert 70 <= changed <= 130  # rate 0.25 of 400 words
    assert all(abs(len(w) - 9) <= 1 for w in damaged)  # one character dropped, doubled or swapped


def test_keep_rates_count_each_kind():
    # 16 samples: kinds alternate clean/mismatched; constant scores, so the fill-up keeps the lowest indices of
    # every batch of 8: with r = 0.5, 4 per batch, i.e. half of each kind on average over random batchings.
    scores = {
        "ppl": torch.ones(16),
        "entropy": torch.ones(16),
        "entropy_response": torch.ones(16),
        "kind": torch.tensor([0, 1] * 8),
    }
    rates = noise_probe.keep_rates(scores, "minmax", "nonpad", 8, 0.5, repeats=50, seed=0)
    # exactly 8 of the 16 kept in every batching, 8 of each kind seen: the two rates add up to 1
    assert rates["clean"] + rates["mismatched"] == pytest.approx(1.0)
    assert 0.3 < rates["clean"] < 0.7
