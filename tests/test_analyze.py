"""`python -m qtuning.analyze`: scores a dataset without training and writes the plot, the table and the export."""

from __future__ import annotations

import csv
import json

import pytest

from qtuning import IGNORE_INDEX
from qtuning.analyze import analyze
from qtuning.errors import QTuningError
from tests.conftest import TINY_DATA, compose_train

TINY = [
    "model=tiny_llama",
    "data=file",
    f"data.path={TINY_DATA}",
    "data.format=prompt_completion",
    "data.batch_size=8",
    "data.max_length=64",
    "num_samples=32",
]


def test_analyze_writes_plot_table_and_pruned_export(tmp_path):
    summary = analyze(compose_train([*TINY, "budget=s50_t70"], tmp_path, "analyze"))
    assert (tmp_path / "eu_plane.png").stat().st_size > 0
    with open(tmp_path / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["samples"] == 32
    assert [int(r["sample_idx"]) for r in rows] == list(range(32))  # file order
    assert sum(r["kept"] == "True" for r in rows) == summary["kept"] >= 4 * 4  # K = 4 per batch of 8, never fewer
    assert sum(summary["quadrants"].values()) == 32
    exported = [json.loads(line) for line in (tmp_path / "pruned.jsonl").read_text().splitlines()]
    assert [e["sample_idx"] for e in exported] == [int(r["sample_idx"]) for r in rows if r["kept"] == "True"]
    for e in exported:
        assert len(e["input_ids"]) == len(e["labels"])
        assert e["labels"][0] == IGNORE_INDEX
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(e["input_ids"], e["labels"], strict=True))


def test_analyze_needs_a_scoring_pruner(tmp_path):
    with pytest.raises(QTuningError, match="does not score samples"):
        analyze(compose_train([*TINY, "pruner=none"], tmp_path, "analyze"))
