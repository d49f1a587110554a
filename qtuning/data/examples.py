"""Rows → examples, one row at a time: read and convert (`read_conversations`), then tokenise (`encode_example`).

The token cache (`qtuning.data.cache`) runs these two steps as a `datasets` pipeline; `load_examples` runs them as a
plain loop in this process, holding every example as Python lists: the reference the cache is tested against, and
enough for a small file in a notebook.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

from transformers import PreTrainedTokenizerBase

from qtuning import IGNORE_INDEX
from qtuning.data.formats import FORMATS, Message, to_messages
from qtuning.data.readers import iter_rows
from qtuning.data.tokenize import encode_conversation
from qtuning.errors import QTuningError

ON_BAD_ROW = ("error", "skip")
MAX_BAD_ROWS_REPORTED = 5  # the first few are enough to find the pattern; the count says how many


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    location: str  # where the row came from, for reports
    instruction: str = ""  # the user turns, joined by newlines (what instruction-based sample pruners score)


@dataclass(frozen=True)
class DataSource:
    """Everything that decides which rows are read and how they become tokens (with the tokenizer)."""

    path: str  # a file, a `datasets` directory, pkg://module/file or hf://org/name
    format: str
    max_length: int
    limit: int | None = None
    salvage_truncated: bool = False
    on_bad_row: str = "error"
    split: str = "train"  # of a Hub data set
    subset: str | None = None  # of a Hub data set

    def check(self) -> None:
        """The settings' own errors, before any row is read."""
        if self.format not in FORMATS:
            raise QTuningError(f"data.format={self.format!r} is unknown; choose one of {', '.join(FORMATS)}")
        if self.max_length < 2:
            raise QTuningError(f"data.max_length={self.max_length} must be at least 2")
        if self.limit is not None and self.limit < 1:
            raise QTuningError(f"data.limit={self.limit} must be at least 1 (or null for every row)")
        if self.on_bad_row not in ON_BAD_ROW:
            raise QTuningError(f"data.on_bad_row={self.on_bad_row!r} must be one of {', '.join(ON_BAD_ROW)}")


@dataclass
class DataReport:
    """What happened to the rows on their way to training; logged once and kept for tests and W&B."""

    rows: int = 0  # every row read, the skipped ones included
    truncated: int = 0
    dropped_no_response: int = 0
    dropped_locations: list[str] = field(default_factory=list)
    skipped_bad_rows: int = 0  # malformed rows skipped under data.on_bad_row=skip
    bad_rows: list[str] = field(default_factory=list)  # the first few of them: "file:line: reason"

    def add_bad_row(self, error: str) -> None:
        self.skipped_bad_rows += 1
        if len(self.bad_rows) < MAX_BAD_ROWS_REPORTED:
            self.bad_rows.append(error)

    def skipped_summary(self) -> str:
        """``N skipped as malformed (first: file:line: reason)``; for when some were."""
        return f"{self.skipped_bad_rows} skipped as malformed (first: {self.bad_rows[0]})"

    def summary(self, path: str, n_train: int, n_val: int) -> str:
        return (
            f"data: {self.rows} rows from {path}; "
            + (f"{self.skipped_summary()}; " if self.skipped_bad_rows else "")
            + f"{self.truncated} truncated to max_length; "
            f"{self.dropped_no_response} dropped with no response tokens"
            + (f" (first: {self.dropped_locations[0]})" if self.dropped_locations else "")
            + f"; {n_train} train / {n_val} validation"
        )

    def check_usable(self, usable: int, source: DataSource) -> None:
        """Raise when nothing was read, or nothing is left to train on (saying why)."""
        if not self.rows:
            raise QTuningError(f"data.path={source.path}: no rows")
        if usable:
            return
        reasons = [self.skipped_summary()] if self.skipped_bad_rows else []
        if self.dropped_no_response:
            reasons.append(
                f"{self.dropped_no_response} without response tokens (empty responses, or prompts that fill "
                f"data.max_length={source.max_length})"
            )
        raise QTuningError(f"data.path={source.path}: no usable rows ({self.rows} read: {'; '.join(reasons)})")


def read_conversations(source: DataSource, report: DataReport) -> Iterator[tuple[str, list[Message]]]:
    """``(location, messages)`` of up to ``source.limit`` rows, each row counted in ``report``.

    A malformed row (not JSON, not UTF-8, a missing or mistyped field, an unknown role) raises its location and
    reason with ``on_bad_row="error"``; with ``"skip"`` it is skipped and counted in the report.
    """
    keep_bad_rows = source.on_bad_row == "skip"
    rows = iter_rows(source.path, source.salvage_truncated, keep_bad_rows, source.split, source.subset)
    for row in islice(rows, source.limit):
        report.rows += 1
        try:
            if row.error:
                raise QTuningError(f"{row.location}: {row.error}")
            messages = to_messages(row, source.format)
        except QTuningError as err:
            if not keep_bad_rows:
                raise
            report.add_bad_row(str(err))
            continue
        yield row.location, messages


def encode_example(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_length: int, location: str
) -> tuple[Example, bool]:
    """One conversation's example and whether it was truncated."""
    encoded = encode_conversation(tokenizer, messages, max_length, location)
    instruction = "\n".join(m["content"] for m in messages if m["role"] == "user")
    return Example(encoded.input_ids, encoded.labels, location, instruction), encoded.truncated


def response_token_count(labels: list[int]) -> int:
    """Loss targets of a row: labels[0] is never a target after the shift, so a row needs a response token at
    position >= 1 (0: it is dropped)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def load_examples(
    tokenizer: PreTrainedTokenizerBase,
    path: str,
    fmt: str,
    max_length: int,
    limit: int | None = None,
    salvage_truncated: bool = False,
    on_bad_row: str = "error",
) -> tuple[list[Example], DataReport]:
    """Read, convert and tokenise up to ``limit`` rows in this process; rows left without a response token are
    dropped and counted. Bad rows as in `read_conversations`."""
    source = DataSource(path, fmt, max_length, limit, salvage_truncated, on_bad_row)
    source.check()
    report = DataReport()
    examples = []
    for location, messages in read_conversations(source, report):
        example, truncated = encode_example(tokenizer, messages, max_length, location)
        report.truncated += truncated
        if not response_token_count(example.labels):
            report.dropped_no_response += 1
            report.dropped_locations.append(location)
            continue
        examples.append(example)
    report.check_usable(len(examples), source)
    return examples, report
