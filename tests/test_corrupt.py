"""The corruptions of `experiments.corrupt`, on hand-written text (no data file)."""

from __future__ import annotations

import random

import pytest

from experiments.corrupt import (
    NOISE_KINDS,
    kind_counts,
    loop,
    noisy_split,
    rotate,
    shuffle_words,
    truncate,
    typos,
)


def test_loop_repeats_the_first_sentence_to_the_length():
    text = "Paris is the capital. It has many museums and a tower."
    assert loop(text) == "Paris is the capital. Paris is the capital."


def test_typos_damage_about_a_quarter_of_the_longer_words():
    text = " ".join(["wonderful"] * 400)
    damaged = typos(text, random.Random(0)).split(" ")
    changed = sum(w != "wonderful" for w in damaged)
    assert 70 <= changed <= 130  # rate 0.25 of 400 words
    assert all(abs(len(w) - 9) <= 1 for w in damaged)  # one character dropped, doubled or swapped


def test_shuffle_words_keeps_the_words_and_changes_their_order():
    text = "one two three four five six seven eight"
    shuffled = shuffle_words(text, random.Random(0))
    assert sorted(shuffled.split(" ")) == sorted(text.split(" "))
    assert shuffled != text
    assert shuffled == shuffle_words(text, random.Random(0))  # seeded


def test_truncate_keeps_the_first_forty_percent_of_the_words():
    assert truncate("a b c d e f g h i j") == "a b c d"  # int(10 · 0.4) = 4
    assert truncate("a b c d e", keep=0.5) == "a b"  # int(2.5) = 2
    assert truncate("single") == "single"  # never empty


def test_rotate_is_a_derangement_that_uses_every_response_once():
    assert rotate(["a", "b", "c"]) == ["b", "c", "a"]
    assert rotate(["a"]) == ["a"]


PAIRS = [(f"prompt {i}", f"answer {i} is here. And more words follow it now.") for i in range(30)]


def test_kind_counts_share_the_noisy_rows_evenly():
    assert kind_counts(6, NOISE_KINDS) == [2, 2, 1, 1]
    assert kind_counts(8, NOISE_KINDS) == [2, 2, 2, 2]


def test_noisy_split_corrupts_the_asked_share_and_records_each_kind():
    split = noisy_split(PAIRS, n_train=20, n_heldout=6, noise=0.3, seed=1)
    kinds = [row["kind"] for row in split.train]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "clean": 14,
        "mismatched": 2,  # round(0.3 · 20) = 6 over four kinds: 2, 2, 1, 1
        "shuffled": 2,
        "loop": 1,
        "truncated": 1,
    }
    own = dict(PAIRS)
    for row, clean in zip(split.train, split.clean, strict=True):
        assert clean == {"prompt": row["prompt"], "completion": own[row["prompt"]], "kind": "clean"}
        response = own[row["prompt"]]
        expected = {
            "clean": response,
            "loop": "answer {} is here. answer {} is here.",
            "truncated": " ".join(response.split()[:4]),  # int(10 words · 0.4)
        }.get(row["kind"])
        if row["kind"] in ("clean", "truncated"):
            assert row["completion"] == expected
        elif row["kind"] == "loop":
            number = row["prompt"].split()[1]
            assert row["completion"] == expected.format(number, number)
        elif row["kind"] == "shuffled":
            assert sorted(row["completion"].split()) == sorted(response.split()) != row["completion"].split()
    # the two mismatched rows carry each other's responses
    a, b = (row for row in split.train if row["kind"] == "mismatched")
    assert (a["completion"], b["completion"]) == (own[b["prompt"]], own[a["prompt"]])


def test_noisy_split_holds_out_disjoint_clean_pairs_and_fixed_matching_pairs():
    split = noisy_split(PAIRS, n_train=20, n_heldout=6, noise=0.3, seed=1)
    train_prompts = {row["prompt"] for row in split.train}
    held = [row["prompt"] for row in split.heldout]
    assert len(set(held)) == 6 and not train_prompts & set(held)
    own = dict(PAIRS)
    assert all(row["completion"] == own[row["prompt"]] for row in split.heldout)
    for i, pair in enumerate(split.matching):
        following = split.heldout[(i + 1) % 6]
        assert pair == {"prompt": held[i], "own": own[held[i]], "other": following["completion"]}


def test_noisy_split_is_deterministic_and_seeded():
    first = noisy_split(PAIRS, 20, 6, 0.3, seed=1)
    assert first == noisy_split(PAIRS, 20, 6, 0.3, seed=1)
    assert first.train != noisy_split(PAIRS, 20, 6, 0.3, seed=2).train


def test_noisy_split_cuts_damaged_responses_with_fit():
    split = noisy_split(PAIRS, 20, 6, 0.3, seed=1, fit=lambda prompt, response: response[:12])
    for row in split.train:
        assert len(row["completion"]) <= 12
    assert all(len(pair["other"]) <= 12 for pair in split.matching)


def test_noisy_split_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="30 pairs for 30 training and 6 held-out"):
        noisy_split(PAIRS, 30, 6, 0.3, seed=1)
    with pytest.raises(ValueError, match="unknown corruption kinds \\['noise'\\]"):
        noisy_split(PAIRS, 20, 6, 0.3, seed=1, kinds=("noise",))
    with pytest.raises(ValueError, match="another pair"):
        noisy_split(PAIRS, 20, 6, 0.2, seed=1)  # round(0.2 · 20) = 4: one mismatched row
