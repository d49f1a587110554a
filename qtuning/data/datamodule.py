"""`SFTDataModule`: rows from a file → tokenised conversations → right-padded batches in the one batch contract.

Batch contract: ``input_ids``, ``attention_mask``, ``labels`` (−100 off the response), ``sample_idx``, all ``[B, T]``
except ``sample_idx`` ``[B]`` (the row's index in its split).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from itertools import islice

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from qtuning import IGNORE_INDEX
from qtuning.data.formats import FORMATS, to_messages
from qtuning.data.plan import EpochPlanner, SampleInfo
from qtuning.data.readers import iter_rows
from qtuning.data.sampling import EpochSampler, ResumableLoader
from qtuning.data.tokenize import encode_conversation
from qtuning.errors import QTuningError

log = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")
MAX_BAD_ROWS_REPORTED = 5  # the first few are enough to find the pattern; the count says how many


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    location: str  # where the row came from, for reports
    instruction: str = ""  # the user turns, joined by newlines (what instruction-based sample pruners score)


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


def load_examples(
    tokenizer: PreTrainedTokenizerBase,
    path: str,
    fmt: str,
    max_length: int,
    limit: int | None = None,
    salvage_truncated: bool = False,
    on_bad_row: str = "error",
) -> tuple[list[Example], DataReport]:
    """Read, convert and tokenise up to ``limit`` rows; rows left without a response token are dropped and counted.

    A malformed row (not JSON, not UTF-8, a missing or mistyped field, an unknown role) raises its location and
    reason with ``on_bad_row="error"``; with ``"skip"`` it is skipped and counted in the report.
    """
    if fmt not in FORMATS:
        raise QTuningError(f"data.format={fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if max_length < 2:
        raise QTuningError(f"data.max_length={max_length} must be at least 2")
    if limit is not None and limit < 1:
        raise QTuningError(f"data.limit={limit} must be at least 1 (or null for every row)")
    if on_bad_row not in ON_BAD_ROW:
        raise QTuningError(f"data.on_bad_row={on_bad_row!r} must be one of {', '.join(ON_BAD_ROW)}")
    report = DataReport()
    examples = []
    for row in islice(iter_rows(path, salvage_truncated, keep_bad_rows=on_bad_row == "skip"), limit):
        report.rows += 1
        try:
            if row.error:
                raise QTuningError(f"{row.location}: {row.error}")
            messages = to_messages(row, fmt)
        except QTuningError as err:
            if on_bad_row == "error":
                raise
            report.add_bad_row(str(err))
            continue
        encoded = encode_conversation(tokenizer, messages, max_length, row.location)
        report.truncated += encoded.truncated
        # labels[0] is never a target after the shift, so a row needs a response token at position >= 1.
        if all(label == IGNORE_INDEX for label in encoded.labels[1:]):
            report.dropped_no_response += 1
            report.dropped_locations.append(row.location)
            continue
        instruction = "\n".join(m["content"] for m in messages if m["role"] == "user")
        examples.append(Example(encoded.input_ids, encoded.labels, row.location, instruction))
    if not report.rows:
        raise QTuningError(f"data.path={path}: no rows")
    if not examples:
        reasons = [report.skipped_summary()] if report.skipped_bad_rows else []
        if report.dropped_no_response:
            reasons.append(
                f"{report.dropped_no_response} without response tokens (empty responses, or prompts that fill "
                f"data.max_length={max_length})"
            )
        raise QTuningError(f"data.path={path}: no usable rows ({report.rows} read: {'; '.join(reasons)})")
    return examples, report


def collate(examples: list[Example], sample_idx: list[int], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of examples into the batch contract."""
    length = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((batch, length), dtype=torch.long)  # [B, T]
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "sample_idx": torch.tensor(sample_idx, dtype=torch.long),  # [B]
    }


class IndexedExamples(torch.utils.data.Dataset):
    """``(dataset index, example)`` pairs: the index is what a batch carries as ``sample_idx``."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, Example]:
        return index, self.examples[index]


class SFTDataModule(LightningDataModule):
    """Supervised fine-tuning data from one local file or `datasets` directory, with a seeded validation split.

    Args:
        tokenizer: the model's tokenizer, with its chat template already chosen.
        path: data file (.json, .jsonl, .parquet), `datasets` directory, or ``pkg://module/file``.
        format: row format, one of ``alpaca``, ``prompt_completion``, ``messages``, ``sharegpt``.
        max_length: tokens per sequence; longer ones are truncated (the start is kept) and counted.
        batch_size: samples per device per step.
        val_size: number of rows held out for validation (seeded), 0 for none.
        limit: read only the first ``limit`` rows.
        salvage_truncated: for a truncated JSON array, keep the rows before the damage instead of failing.
        on_bad_row: ``error`` stops at a malformed row, naming it; ``skip`` skips such rows and counts them.
        seed: seed of the validation split and of the training shuffle.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        path: str,
        format: str,
        max_length: int = 512,
        batch_size: int = 8,
        val_size: int = 0,
        limit: int | None = None,
        salvage_truncated: bool = False,
        on_bad_row: str = "error",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise QTuningError(f"data.batch_size={batch_size} must be at least 1")
        self.tokenizer = tokenizer
        self.path, self.format, self.max_length = path, format, max_length
        self.batch_size, self.val_size, self.limit = batch_size, val_size, limit
        self.salvage_truncated, self.on_bad_row = salvage_truncated, on_bad_row
        self.seed, self.num_workers = seed, num_workers
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.report: DataReport | None = None
        self.planner: EpochPlanner | None = None  # plans each epoch's samples (see `connect`); None: all of them
        self.window = 1  # micro-batches per training batch (see `connect`)

    def connect(self, planner: EpochPlanner | None, window: int = 1) -> None:
        """What the run hands over once, before training: the planner of each epoch's samples (a dataset-level
        sample pruner), or None to train on every sample every epoch; and ``window``, the micro-batches of
        ``batch_size`` rows one training batch holds (a whole accumulation window, when the module trains each
        window itself; 1 otherwise)."""
        self.planner, self.window = planner, window

    def setup(self, stage: str | None = None) -> None:
        if self.report is not None:
            return
        examples, self.report = load_examples(
            self.tokenizer,
            self.path,
            self.format,
            self.max_length,
            self.limit,
            self.salvage_truncated,
            self.on_bad_row,
        )
        if self.val_size >= len(examples):
            raise QTuningError(f"data.val_size={self.val_size} leaves no training rows out of {len(examples)}")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_examples = [examples[i] for i in sorted(order[: self.val_size])]
        self.train_examples = [examples[i] for i in sorted(order[self.val_size :])]
        log.info(self.report.summary(self.path, len(self.train_examples), len(self.val_examples)))

    def _collate(self, items: list[tuple[int, Example]]) -> dict[str, Tensor]:
        return collate([e for _, e in items], [i for i, _ in items], self.pad_id)

    def _loader(
        self, examples: list[Example], indices: list[int], epoch: int = 0, shuffle: bool = False, window: int = 1
    ) -> DataLoader:
        """This process's share of ``indices`` of ``examples`` (in an order fixed by seed and epoch when shuffled), in
        batches of ``window`` × ``batch_size`` rows; Lightning checkpoints its position, so a resumed run continues
        mid-epoch (see `qtuning.data.sampling`)."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return ResumableLoader(
            IndexedExamples(examples),
            sampler=EpochSampler(indices, self.seed, epoch, rank, world, shuffle),
            batch_size=self.batch_size * window,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            epoch=epoch,
            position=self._batches_trained,
        )

    def _batches_trained(self) -> int:
        """Training batches of the current epoch trained so far (what a checkpoint written now has seen)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def sample_info(self) -> SampleInfo:
        """What dataset-level sample pruners score the training samples by."""
        response = [sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in self.train_examples]
        return SampleInfo(torch.tensor(response), [e.instruction for e in self.train_examples])

    def _epochs(self) -> tuple[int, int]:
        """(the epoch about to run, max_epochs); a sample pruner's plan depends on both."""
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        max_epochs = trainer.max_epochs if trainer is not None and (trainer.max_epochs or 0) > 0 else None
        if max_epochs is None:
            raise QTuningError("a dataset-level sample pruner plans per epoch: set trainer.max_epochs (> 0)")
        return epoch, max_epochs

    def train_dataloader(self) -> DataLoader:
        """This epoch's loader (Lightning rebuilds it every epoch, see `train`): every training sample, or the
        planner's plan, shuffled from (seed, epoch), in batches of ``window`` micro-batches."""
        if self.planner is None:
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            indices = list(range(len(self.train_examples)))
            return self._loader(self.train_examples, indices, epoch, shuffle=True, window=self.window)
        epoch, max_epochs = self._epochs()
        plan = self.planner.epoch_plan(epoch, self.sample_info(), max_epochs)
        return self._loader(self.train_examples, plan.indices.tolist(), epoch, shuffle=True, window=self.window)

    def planned_batches(self, from_epoch: int = 0) -> list[int] | None:
        """Training batches per device of every epoch from ``from_epoch`` to the last, as planned now (for the run's
        length, without building a loader: Lightning then builds the first one itself and can restore its position
        on resume); None when the run has no epoch limit."""
        trainer = self.trainer
        max_epochs = trainer.max_epochs if trainer is not None else None
        if not max_epochs or max_epochs < 0:
            return None
        if self.planner is None:
            sizes = [len(self.train_examples)] * (max_epochs - from_epoch)
        else:
            sizes = self.planner.planned_sizes(from_epoch, self.sample_info(), max_epochs)
        rows = self.batch_size * self.window
        return [math.ceil(math.ceil(size / trainer.world_size) / rows) for size in sizes]

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_examples, list(range(len(self.val_examples))))

    def predict_dataloader(self, limit: int | None = None) -> DataLoader:
        """The first ``limit`` training rows in file order, unshuffled (for scoring a dataset without training)."""
        examples = self.train_examples[:limit]
        return self._loader(examples, list(range(len(examples))))
