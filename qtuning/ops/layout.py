"""How a pass lays out its rows for the model: the one place that decides it.

- padded (the default): the rows of the right-padded batch, trimmed to their longest;
- packed (``data.padding_free``): the samples' tokens concatenated into rows of at most ``capacity`` tokens, with
  ``position_ids`` that restart at every sample and no ``attention_mask``, so that the model's attention keeps each
  sample to itself (transformers builds a block-diagonal mask, or uses flash-attention's varlen path, from the
  ``position_ids``); each sample's first label is −100, so that no label crosses a boundary. A row's tail is padding,
  a segment of its own that nothing attends to and nothing learns from.

Either way a pass's per-target values (NLL, entropy, cross-entropy) come back in the samples' own layout ``[N, T-1]``
(`PassRows.samples`), and per-target weights go out from it (`PassRows.positions`): statistics, decisions and losses
read the same in both layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qtuning import IGNORE_INDEX
from qtuning.ops.passes import base_model, final_hidden_states, output_head, select_rows
from qtuning.ops.stats import BatchStats

Batch = dict[str, Tensor]


@dataclass
class PassRows:
    """Some rows of a batch as one pass runs them."""

    inputs: Batch  # input_ids, labels, attention_mask (1 on real tokens) [R, L], and position_ids when packed
    rows: Tensor  # [N] the batch rows they are, in order
    width: int  # T: the longest of the N samples, the width of their own layout
    target: tuple[Tensor, Tensor] | None = None  # packed: ([N, T-1] pass row, [N, T-1] pass column) of each target
    valid: Tensor | None = None  # packed: [N, T-1] bool, the targets that exist (t < length - 1)

    @property
    def positions_run(self) -> int:
        """Positions through the model, padding included."""
        return self.inputs["input_ids"].numel()

    def samples(self, values: Tensor) -> Tensor:
        """``[N, T-1]``: per-target values of the pass ``[R, L-1]`` at each sample's own targets (0 beyond)."""
        if self.target is None:
            return values
        return torch.where(self.valid, values[self.target], torch.zeros((), dtype=values.dtype, device=values.device))

    def positions(self, values: Tensor) -> Tensor:
        """``[R, L-1]``: per-target values of the samples ``[N, T-1]`` at their targets in the pass (0 elsewhere)."""
        if self.target is None:
            return values
        rows, cols = self.inputs["input_ids"].shape
        out = values.new_zeros(rows, cols - 1)
        out[self.target[0][self.valid], self.target[1][self.valid]] = values[self.valid]
        return out

    def sample_stats(self, stats: BatchStats, sample_idx: Tensor | None) -> BatchStats:
        """The pass's statistics ``[R, L-1]`` as the samples' ``[N, T-1]``."""
        if self.target is None:
            stats.sample_idx = sample_idx
            return stats
        return BatchStats(
            response_mask=self.samples(stats.response_mask),
            nonpad_mask=self.valid,
            token_nll=None if stats.token_nll is None else self.samples(stats.token_nll),
            token_entropy=None if stats.token_entropy is None else self.samples(stats.token_entropy),
            sample_idx=sample_idx,
        )


def padded_rows(batch: Batch, rows: Tensor) -> PassRows:
    """The given rows of a right-padded batch, trimmed to their own longest sequence (`select_rows`)."""
    inputs = select_rows(batch, rows)
    return PassRows(inputs, rows, inputs["input_ids"].shape[1])


def balanced_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` in the fewest bins of at most ``capacity`` that a balanced fill finds: longest first,
    each into the least filled of ``n`` bins (LPT), ``n`` from ``⌈Σ/capacity⌉`` up. Balanced rather than first-fit,
    because a pass's rows are as wide as its fullest: evenly filled rows leave the least padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for n in range(max(1, math.ceil(sum(lengths) / capacity)), len(lengths) + 1):
        bins: list[list[int]] = [[] for _ in range(n)]
        loads = [0] * n
        for i in order:
            b = loads.index(min(loads))
            bins[b].append(i)
            loads[b] += lengths[i]
        if max(loads) <= capacity:
            return bins
    raise ValueError(f"a sequence is longer than the capacity {capacity}: {max(lengths)}")


def packed_rows(batch: Batch, rows: Tensor, capacity: int) -> PassRows:
    """The given rows of a right-padded batch packed into rows of at most ``capacity`` tokens (see the module)."""
    lengths = batch["attention_mask"][rows].sum(1)  # [N]
    sizes = lengths.tolist()
    bins = balanced_bins(sizes, max(capacity, max(sizes)))
    n_rows, width = len(bins), max(sum(sizes[i] for i in members) for members in bins)
    device = batch["input_ids"].device
    input_ids = torch.zeros(n_rows, width, dtype=batch["input_ids"].dtype, device=device)  # [R, L]
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=batch["labels"].dtype, device=device)  # [R, L]
    attention_mask = torch.zeros(n_rows, width, dtype=batch["attention_mask"].dtype, device=device)  # [R, L]
    position_ids = torch.zeros(n_rows, width, dtype=torch.long, device=device)  # [R, L]
    row_of = torch.zeros(len(sizes), dtype=torch.long, device=device)  # [N]
    start_of = torch.zeros(len(sizes), dtype=torch.long, device=device)  # [N]
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            n, source = sizes[i], rows[i]
            span = slice(start, start + n)
            input_ids[r, span] = batch["input_ids"][source, :n]
            labels[r, span] = batch["labels"][source, :n]
            labels[r, start] = IGNORE_INDEX  # predicted from the previous sample's last token: never a target
            attention_mask[r, span] = 1
            position_ids[r, span] = torch.arange(n, device=device)
            row_of[i], start_of[i] = r, start
            start += n
        position_ids[r, start:] = torch.arange(width - start, device=device)  # the tail: a segment of its own
    t = torch.arange(int(lengths.max()) - 1, device=device)  # [T-1]
    valid = t[None, :] < (lengths - 1)[:, None]  # [N, T-1]
    cols = (start_of[:, None] + t[None, :]).clamp(max=width - 2)  # [N, T-1]; clamped columns are never valid
    inputs = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
    return PassRows(inputs, rows, int(lengths.max()), (row_of[:, None].expand_as(cols), cols), valid)


@dataclass(frozen=True)
class Layout:
    """The layout of every pass of a run: ``packed`` rows of at most ``capacity`` tokens (``data.padding_free``,
    ``data.max_length``), or right-padded rows. ``required``: packed because the run asked for it (``true``), so a
    model that cannot run packed passes stops the run; otherwise (``auto``) such a model runs padded ones."""

    packed: bool = False
    capacity: int = 0
    required: bool = False

    def rows(self, batch: Batch, rows: Tensor | None = None) -> PassRows:
        """``rows`` ``[N]`` of ``batch`` (None: all) as a pass runs them."""
        if rows is None:
            rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        return packed_rows(batch, rows, self.capacity) if self.packed else padded_rows(batch, rows)


def packing_leak(model: torch.nn.Module) -> float:
    """How much a sample's final hidden states change when another sample precedes it in a packed row (relative
    norm of the change): about 0 where attention keeps packed samples apart, of order 1 where it does not."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, output_head(model).vocab_size, (1, 12), generator=generator).to(device)  # [1, 12]
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)  # two samples: 5 and 7 tokens
    was_training = model.training
    model.eval()  # no dropout: only the packing may differ
    try:
        with torch.no_grad():
            alone = final_hidden_states(model, {"input_ids": ids[:, 5:], "attention_mask": torch.ones_like(ids[:, 5:])})
            packed = final_hidden_states(model, {"input_ids": ids, "position_ids": positions})
    finally:
        model.train(was_training)
    alone, second = alone.float(), packed[:, 5:].float()
    return float((second - alone).norm() / alone.norm().clamp(min=1e-12))


def packing_problem(model: torch.nn.Module, tolerance: float = 0.05) -> str | None:
    """What is wrong with packed passes on ``model``, if anything (`packing_leak` above ``tolerance``): a model,
    attention implementation or transformers version that ignores the restarting ``position_ids``."""
    leak = packing_leak(model)
    if leak <= tolerance:
        return None
    base = base_model(model)
    return (
        f"packed samples see each other in {type(base).__name__} (attn_implementation="
        f"{getattr(base.config, '_attn_implementation', None)}): a sample's hidden states change by {leak:.2g} "
        "(relative) when another precedes it in its row"
    )
