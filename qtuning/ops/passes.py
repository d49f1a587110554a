"""Model passes over a batch: the final hidden states through the model's own forward, then the LM head in chunks.

The model is always called through its own ``forward`` (peft's, Hugging Face's), so a sharding strategy (FSDP,
DeepSpeed ZeRO-3) gathers the parameters as for any forward; the LM head, called as a module, runs on no position
inside it. `output_head` then gives the head back as a function of ``[c, H]`` hidden states, which `BatchStats` and
`token_loss` call on chunks of the positions that count: no path holds ``[B, T, V]`` logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qtuning.ops.loss import OutputHead
from qtuning.ops.stats import BatchStats

Batch = dict[str, Tensor]


def base_model(model: torch.nn.Module) -> Any:
    """The Hugging Face model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def select_rows(batch: Batch, rows: Tensor) -> Batch:
    """The given rows of a right-padded batch, trimmed to their own longest sequence."""
    length = int(batch["attention_mask"][rows].sum(1).max())
    return {key: value[rows] if key == "sample_idx" else value[rows, :length] for key, value in batch.items()}


def length_groups(keep: Tensor, lengths: Tensor, size: int) -> list[Tensor]:
    """The kept rows of ``keep`` ``[W]``, shortest first, in groups of at most ``size`` (one empty group when none is
    kept): training micro-batches whose rows are of similar ``lengths`` ``[W]``, so that re-padding each to its
    longest adds little."""
    rows = keep.nonzero().squeeze(1)  # [K]
    order = torch.sort(lengths[rows], stable=True).indices
    return list(rows[order].split(size))


def final_hidden_states(model: torch.nn.Module, batch: Batch) -> Tensor:
    """``[B, T, H]``: what the LM head would see, from the model's own forward (with autograd if it is enabled), over
    right-padded rows (with their ``attention_mask``) or packed rows (with their ``position_ids``).

    A pre-hook hands the head an empty slice of positions, so the forward computes no logits.
    """
    head = base_model(model).get_output_embeddings()
    captured: list[Tensor] = []

    def keep_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    if "position_ids" in batch:  # packed rows (`qtuning.ops.layout`): the restarting positions separate the samples
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    handle = head.register_forward_pre_hook(keep_input)
    try:
        # no cache: transformers reads packed rows from position_ids only when it creates none (and then no mask may
        # be given), and a cache is of no use to a single forward
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def output_head(model: torch.nn.Module) -> OutputHead:
    """The model's output layer, its vocabulary size and final logit soft-cap (Gemma 2's), as an `OutputHead`."""
    base = base_model(model)
    module = base.get_output_embeddings()
    text_config = base.config.get_text_config()
    vocab_size = getattr(module, "out_features", None) or text_config.vocab_size
    return OutputHead(module, vocab_size, getattr(text_config, "final_logit_softcapping", None))


def scoring_forward(model: torch.nn.Module, batch: Batch) -> BatchStats:
    """No-grad scoring pass: `final_hidden_states`, then fp32 NLL and entropy with the LM head chunk by chunk."""
    with torch.no_grad():
        hidden = final_hidden_states(model, batch)  # [B, T, H]
    head = output_head(model)
    return BatchStats.from_hidden_states(
        hidden, head, head.vocab_size, batch["labels"], batch["attention_mask"], batch.get("sample_idx")
    )
