"""Per-token statistics of a batch under the current model: the one place where labels are shifted.

Position ``i`` of every ``[B, T-1]`` tensor here is the prediction of token ``i + 1`` from the logits at ``i``
(``logits[:, :-1]`` against ``labels[:, 1:]``). All statistics are fp32 under any precision: the LM head may run in
the autocast or model dtype, the softmax, logs and sums never do. Only non-pad positions are scored, a chunk of them
at a time: the full ``[B, T, V]`` logits are never upcast at once, and from hidden states never exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from qtuning import IGNORE_INDEX

# Largest chunk of logits (elements) materialised at once: 2**24 on a CPU (64 MiB in fp32; a few such temporaries live
# together; measured fastest of 2**22 to 2**26 at 128k vocabularies), 2**26 on CUDA (about 512 positions of a 128k
# vocabulary). Large enough that the LM head's matmuls run efficiently and that the fused loss adds its [V, H] weight
# gradient up a few dozen times per step, not hundreds.
MAX_CHUNK_ELEMENTS = {"cpu": 2**24, "cuda": 2**26}


def chunk_positions(vocab_size: int, device: torch.device) -> int:
    """Positions per chunk: as many as fit in the device's `MAX_CHUNK_ELEMENTS` logits."""
    return max(1, MAX_CHUNK_ELEMENTS.get(device.type, MAX_CHUNK_ELEMENTS["cpu"]) // vocab_size)


def full_precision(device: torch.device) -> torch.autocast:
    """A region where autocast is off, so that fp32 tensors stay fp32 (autocast runs `vecdot`, `einsum`, `matmul` in
    bf16/fp16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def shift_targets(labels: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token targets and masks for ``[B, T]`` labels (−100 off the response) and attention mask.

    Returns ``targets`` (``[B, T-1]`` long, −100 kept), ``response_mask`` and ``nonpad_mask`` (``[B, T-1]`` bool).
    """
    targets = labels[:, 1:]  # [B, T-1]
    nonpad_mask = attention_mask[:, 1:].bool()  # [B, T-1]
    response_mask = (targets != IGNORE_INDEX) & nonpad_mask  # [B, T-1]
    return targets, response_mask, nonpad_mask


def _chunked_nll_entropy(
    logits_at: Callable[[Tensor, Tensor], Tensor],
    targets: Tensor,
    response_mask: Tensor,
    nonpad_mask: Tensor,
    vocab_size: int,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """NLL and entropy at the non-pad positions, ``chunk_size`` positions at a time.

    ``logits_at(rows, cols)`` gives the ``[c, V]`` logits that predict ``targets[rows, cols]``.
    """
    if chunk_size is None:
        chunk_size = chunk_positions(vocab_size, targets.device)
    token_nll = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)  # [B, T-1]
    token_entropy = torch.zeros_like(token_nll)  # [B, T-1]
    rows, cols = nonpad_mask.nonzero(as_tuple=True)  # [N], [N]: padding is never scored
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        logits = logits_at(r, c)  # [c, V] in the head's (or autocast's) dtype
        with full_precision(logits.device):
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # [c, V] fp32
            nll = -log_probs.gather(-1, targets[r, c].clamp(min=0)[:, None]).squeeze(-1)  # [c]; −100 masked below
            token_nll[r, c] = nll * response_mask[r, c]
            token_entropy[r, c] = -torch.linalg.vecdot(log_probs.exp(), log_probs)  # −Σ p log p, no [c, V] product
    return token_nll, token_entropy


@dataclass
class BatchStats:
    """What a pruning policy sees of a batch; ``token_nll``/``token_entropy`` are None if it needs no scores."""

    response_mask: Tensor  # [B, T-1] bool: the target is a response token (label != -100) and not padding
    nonpad_mask: Tensor  # [B, T-1] bool: the target is not padding
    token_nll: Tensor | None = None  # [B, T-1] fp32, −log p(label), 0 outside the response
    token_entropy: Tensor | None = None  # [B, T-1] fp32, full-vocabulary entropy (nats), 0 at padding
    sample_idx: Tensor | None = None  # [B] dataset index of each row
    ref_nll: Tensor | None = None  # [B, T-1] fp32, a reference model's NLL (Rho-1's `enrich`)
    token_scores: Tensor | None = None  # [B, T-1] fp32, a score of each target token from an extra pass (FastV's)

    @property
    def batch_size(self) -> int:
        return self.response_mask.shape[0]

    @classmethod
    def from_masks(cls, labels: Tensor, attention_mask: Tensor, sample_idx: Tensor | None = None) -> BatchStats:
        """Masks only, for policies that decide without looking at the model (``needs_scores = False``)."""
        _, response_mask, nonpad_mask = shift_targets(labels, attention_mask)
        return cls(response_mask=response_mask, nonpad_mask=nonpad_mask, sample_idx=sample_idx)

    @classmethod
    def from_logits(
        cls,
        logits: Tensor,
        labels: Tensor,
        attention_mask: Tensor,
        sample_idx: Tensor | None = None,
        chunk_size: int | None = None,
    ) -> BatchStats:
        """Statistics from ``[B, T, V]`` logits in any dtype; each chunk of positions is upcast to fp32 on its own."""
        logits = logits.detach()
        return cls._from_chunks(
            lambda r, c: logits[r, c], logits.shape[-1], labels, attention_mask, sample_idx, chunk_size
        )

    @classmethod
    def from_hidden_states(
        cls,
        hidden_states: Tensor,
        lm_head: Callable[[Tensor], Tensor],
        vocab_size: int,
        labels: Tensor,
        attention_mask: Tensor,
        sample_idx: Tensor | None = None,
        chunk_size: int | None = None,
    ) -> BatchStats:
        """Statistics from the final ``[B, T, H]`` hidden states; ``lm_head`` maps ``[c, H]`` to ``[c, V]`` logits and
        runs chunk by chunk (no full logits), without autograd."""
        hidden_states = hidden_states.detach()
        with torch.no_grad():
            return cls._from_chunks(
                lambda r, c: lm_head(hidden_states[r, c]),
                vocab_size,
                labels,
                attention_mask,
                sample_idx,
                chunk_size,
            )

    @classmethod
    def _from_chunks(
        cls,
        logits_at: Callable[[Tensor, Tensor], Tensor],
        vocab_size: int,
        labels: Tensor,
        attention_mask: Tensor,
        sample_idx: Tensor | None,
        chunk_size: int | None,
    ) -> BatchStats:
        targets, response_mask, nonpad_mask = shift_targets(labels, attention_mask)
        token_nll, token_entropy = _chunked_nll_entropy(
            logits_at, targets, response_mask, nonpad_mask, vocab_size, chunk_size
        )
        return cls(response_mask, nonpad_mask, token_nll=token_nll, token_entropy=token_entropy, sample_idx=sample_idx)

    def sample_ppl(self) -> Tensor:
        """``[B]`` fp32: exp of the mean response NLL (a row without response tokens gets exp(0) = 1)."""
        if self.token_nll is None:
            raise ValueError("sample_ppl needs token_nll: the policy must set needs_scores = True")
        n_resp = self.response_mask.sum(1).clamp(min=1)  # [B]
        return torch.exp((self.token_nll * self.response_mask).sum(1) / n_resp)

    def sample_entropy(self, scope: str = "nonpad") -> Tensor:
        """``[B]`` fp32: mean token entropy over non-pad positions (the authors' code) or over response positions."""
        if self.token_entropy is None:
            raise ValueError("sample_entropy needs token_entropy: the policy must set needs_scores = True")
        if scope not in ("nonpad", "response"):
            raise ValueError(f"entropy scope must be 'nonpad' or 'response', got {scope!r}")
        mask = self.nonpad_mask if scope == "nonpad" else self.response_mask  # [B, T-1]
        return (self.token_entropy * mask).sum(1) / mask.sum(1).clamp(min=1)


def concat_stats(parts: list[BatchStats]) -> BatchStats:
    """The statistics of several batches as one: rows concatenated in order, positions right-padded to the longest
    (padding is False in the masks and 0 elsewhere); a field is kept only if every part has it."""
    length = max(part.response_mask.shape[1] for part in parts)

    def cat(name: str) -> Tensor | None:
        values = [getattr(part, name) for part in parts]
        if any(value is None for value in values):
            return None
        if values[0].dim() == 1:  # [B] per-row fields
            return torch.cat(values)
        return torch.cat([torch.nn.functional.pad(value, (0, length - value.shape[1])) for value in values])

    return BatchStats(**{field.name: cat(field.name) for field in fields(BatchStats)})
