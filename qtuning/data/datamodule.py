"""`SFTDataModule`: rows from a file → tokenised conversations → right-padded batches in the one batch contract.

Batch contract: ``input_ids``, ``attention_mask``, ``labels`` (−100 off the response), ``sample_idx``, all ``[B, T]``
except ``sample_idx`` ``[B]`` (the row's index in its split).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from qtuning import IGNORE_INDEX
from qtuning.data.formats import FORMATS, to_messages
from qtuning.data.readers import iter_rows
from qtuning.data.tokenize import encode_conversation
from qtuning.errors import QTuningError
from qtuning.pruning.sample_level import SampleInfo

if TYPE_CHECKING:
    from qtuning.pruning.combo import ComboPolicy

log = logging.getLogger(__name__)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    location: str  # where the row came from, for reports
    instruction: str = ""  # the user turns, joined by newlines (what instruction-based sample pruners score)


@dataclass
class DataReport:
    """What happened to the rows on their way to training; logged once and kept for tests and W&B."""

    rows: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    dropped_locations: list[str] = field(default_factory=list)

    def summary(self, path: str, n_train: int, n_val: int) -> str:
        return (
            f"data: {self.rows} rows from {path}; {self.truncated} truncated to max_length; "
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
) -> tuple[list[Example], DataReport]:
    """Read, convert and tokenise up to ``limit`` rows; rows left without a response token are dropped and counted."""
    if fmt not in FORMATS:
        raise QTuningError(f"data.format={fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if max_length < 2:
        raise QTuningError(f"data.max_length={max_length} must be at least 2")
    report = DataReport()
    examples = []
    for row in islice(iter_rows(path, salvage_truncated), limit):
        report.rows += 1
        messages = to_messages(row, fmt)
        encoded = encode_conversation(tokenizer, messages, max_length, row.location)
        report.truncated += encoded.truncated
        # labels[0] is never a target after the shift, so a row needs a response token at position >= 1.
        if all(label == IGNORE_INDEX for label in encoded.labels[1:]):
            report.dropped_no_response += 1
            report.dropped_locations.append(row.location)
            continue
        instruction = "\n".join(m["content"] for m in messages if m["role"] == "user")
        examples.append(Example(encoded.input_ids, encoded.labels, row.location, instruction))
    if not examples:
        raise QTuningError(f"data.path={path}: no usable rows ({report.rows} read, all without response tokens)")
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
    """``(dataset index, example)`` pairs of the examples at ``indices`` (all of them by default)."""

    def __init__(self, examples: list[Example], indices: list[int] | None = None) -> None:
        self.examples = examples
        self.indices = list(range(len(examples))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[int, Example]:
        return self.indices[index], self.examples[self.indices[index]]


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
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise QTuningError(f"data.batch_size={batch_size} must be at least 1")
        self.tokenizer = tokenizer
        self.path, self.format, self.max_length = path, format, max_length
        self.batch_size, self.val_size, self.limit = batch_size, val_size, limit
        self.salvage_truncated, self.seed, self.num_workers = salvage_truncated, seed, num_workers
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.report: DataReport | None = None
        #: a policy with a dataset-level sample pruner plans each epoch's samples (set by `train`); None: all
        self.planner: ComboPolicy | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.report is not None:
            return
        examples, self.report = load_examples(
            self.tokenizer, self.path, self.format, self.max_length, self.limit, self.salvage_truncated
        )
        if self.val_size >= len(examples):
            raise QTuningError(f"data.val_size={self.val_size} leaves no training rows out of {len(examples)}")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_examples = [examples[i] for i in sorted(order[: self.val_size])]
        self.train_examples = [examples[i] for i in sorted(order[self.val_size :])]
        log.info(self.report.summary(self.path, len(self.train_examples), len(self.val_examples)))

    def _collate(self, items: list[tuple[int, Example]]) -> dict[str, Tensor]:
        return collate([e for _, e in items], [i for i, _ in items], self.pad_id)

    def _loader(self, dataset: IndexedExamples, shuffle_seed: int | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle_seed is not None,
            generator=torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

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
        """This epoch's loader: every training sample, or the planner's plan (rebuilt each epoch, see `train`)."""
        if self.planner is None:
            return self._loader(IndexedExamples(self.train_examples), shuffle_seed=self.seed)
        epoch, max_epochs = self._epochs()
        plan = self.planner.epoch_plan(epoch, self.sample_info(), max_epochs)
        # Shuffled here, from (seed, epoch) alone, so that the order does not depend on how often Lightning
        # iterates the loader (a resumed run does not); the loader then reads it in order.
        order = torch.randperm(plan.indices.numel(), generator=torch.Generator().manual_seed(self.seed + epoch))
        return self._loader(IndexedExamples(self.train_examples, plan.indices[order].tolist()))

    def remaining_batches(self) -> int | None:
        """Batches per device this epoch and the ones after it, as planned (None without a planner)."""
        if self.planner is None or self.planner.sample_pruner is None:
            return None
        epoch, max_epochs = self._epochs()
        world = self.trainer.world_size if self.trainer is not None else 1
        sizes = self.planner.sample_pruner.expected_sizes(epoch, self.sample_info(), max_epochs)
        return sum(math.ceil(math.ceil(size / world) / self.batch_size) for size in sizes)

    def val_dataloader(self) -> DataLoader:
        return self._loader(IndexedExamples(self.val_examples))

    def predict_dataloader(self, limit: int | None = None) -> DataLoader:
        """The first ``limit`` training rows in file order, unshuffled (for scoring a dataset without training)."""
        return self._loader(IndexedExamples(self.train_examples[:limit]))
