"""`SFTDataModule`: rows from a file → the token cache (tokenised once, memory-mapped) → right-padded batches in the
one batch contract.

Batch contract: ``input_ids``, ``attention_mask``, ``labels`` (−100 off the response), ``sample_idx``, all ``[B, T]``
except ``sample_idx`` ``[B]`` (the row's index in its split).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from qtuning import IGNORE_INDEX
from qtuning.data.cache import TokenizedSplit, load, prepare
from qtuning.data.examples import DataReport, DataSource, Example
from qtuning.data.plan import EpochPlanner, SampleInfo
from qtuning.data.sampling import EpochSampler, ResumableLoader
from qtuning.errors import QTuningError

log = logging.getLogger(__name__)


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
    """``(split index, example)`` pairs, a batch read at once: the index is what a batch carries as ``sample_idx``."""

    def __init__(self, examples: TokenizedSplit) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, Example]:
        return index, self.examples[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, Example]]:
        return list(zip(indices, self.examples.take(indices), strict=True))


class SFTDataModule(LightningDataModule):
    """Supervised fine-tuning data from one local file, `datasets` directory or Hub data set, with a seeded validation
    split. Rows are tokenised once into the token cache (`qtuning.data.cache`) and read from it batch by batch.

    Args:
        tokenizer: the model's tokenizer, with its chat template already chosen.
        path: data file (.json, .jsonl, .parquet), `datasets` directory, ``pkg://module/file`` or ``hf://org/name``.
        format: row format, one of ``alpaca``, ``prompt_completion``, ``messages``, ``sharegpt``.
        max_length: tokens per sequence; longer ones are truncated (the start is kept) and counted.
        batch_size: samples per device per step.
        val_size: number of rows held out for validation (seeded), 0 for none.
        limit: read only the first ``limit`` rows.
        salvage_truncated: for a truncated JSON array, keep the rows before the damage instead of failing.
        on_bad_row: ``error`` stops at a malformed row, naming it; ``skip`` skips such rows and counts them.
        seed: seed of the validation split and of the training shuffle.
        num_workers: data loader workers.
        num_proc: processes that tokenise a new cache entry; None: one per CPU core, for at least 1,000 rows each.
        cache_dir: where the token cache lives; None: ``$QTUNING_CACHE_DIR/data`` (``~/.cache/qtuning/data``).
        split: the split of a Hub data set.
        subset: the subset (configuration) of a Hub data set, or None.
        padding_free: whether the model's passes run the batches' samples packed into rows of at most
            ``max_length`` tokens instead of right-padded (`qtuning.ops.Layout`): ``true``, ``false``, or ``"auto"``
            (packed where the model allows it); the batches are the same.
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
        num_proc: int | None = None,
        cache_dir: str | None = None,
        split: str = "train",
        subset: str | None = None,
        padding_free: bool | str = "auto",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise QTuningError(f"data.batch_size={batch_size} must be at least 1")
        if padding_free not in (True, False, "auto"):
            raise QTuningError(f"data.padding_free={padding_free!r} must be true, false or auto")
        self.tokenizer = tokenizer
        self.path = path
        self.source = DataSource(path, format, max_length, limit, salvage_truncated, on_bad_row, split, subset)
        self.batch_size, self.val_size = batch_size, val_size
        self.seed, self.num_workers, self.num_proc, self.cache_dir = seed, num_workers, num_proc, cache_dir
        self.padding_free = padding_free
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.entry: Path | None = None  # the token cache entry, once prepared
        self.train_examples: Sequence[Example] = []
        self.val_examples: Sequence[Example] = []
        self.report: DataReport | None = None
        self._sample_info: SampleInfo | None = None
        self.planner: EpochPlanner | None = None  # plans each epoch's samples (see `connect`); None: all of them
        self.window = 1  # micro-batches per training batch (see `connect`)

    def connect(self, planner: EpochPlanner | None, window: int = 1) -> None:
        """What the run hands over once, before training: the planner of each epoch's samples (a dataset-level
        sample pruner), or None to train on every sample every epoch; and ``window``, the micro-batches of
        ``batch_size`` rows one training batch holds (`qtuning.module.StepScope.window`: one decision's rows)."""
        self.planner, self.window = planner, window

    def prepare_data(self) -> None:
        """Build the token cache entry unless it is there (Lightning calls this on one process per node; another
        process that gets here first builds it under the entry's lock, and the rest wait and map it)."""
        if self.entry is None:
            self.entry = prepare(self.source, self.tokenizer, self.cache_dir, self.num_proc)

    def setup(self, stage: str | None = None) -> None:
        if self.report is not None:
            return
        self.prepare_data()
        tokens, self.report = load(self.entry)
        usable = np.flatnonzero(np.asarray(tokens.data.table.column("response_tokens")) > 0)  # [N] table rows
        if self.val_size >= len(usable):
            raise QTuningError(f"data.val_size={self.val_size} leaves no training rows out of {len(usable)}")
        order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(self.seed)).numpy()
        self.val_examples = TokenizedSplit(tokens, usable[np.sort(order[: self.val_size])])
        self.train_examples = TokenizedSplit(tokens, usable[np.sort(order[self.val_size :])])
        self._sample_info = SampleInfo(
            torch.from_numpy(self.train_examples.response_tokens().astype(np.int64)),
            self.train_examples.instructions(),
        )
        log.info(self.report.summary(self.path, len(self.train_examples), len(self.val_examples)))

    def _collate(self, items: list[tuple[int, Example]]) -> dict[str, Tensor]:
        return collate([e for _, e in items], [i for i, _ in items], self.pad_id)

    def _loader(
        self, examples: TokenizedSplit, indices: list[int], epoch: int = 0, shuffle: bool = False, window: int = 1
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
        """What dataset-level sample pruners score the training samples by (read as columns of the token cache)."""
        if self._sample_info is None:
            raise RuntimeError("the data module is not set up yet: call setup() first")
        return self._sample_info

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
