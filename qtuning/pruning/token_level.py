"""In-batch token pruners, the token baselines of docs/method.md §7: Random, PPL, FastV, SparseVLM and Rho-1.

Every row is kept (sample pruning is a separate, dataset-level pruner); each policy keeps a fraction r_token of the
candidate positions, `loss_positions(stats, loss_norm)`. The authors' baseline path counts every non-pad position,
prompt included, as a candidate (``nonpad``; the cross-entropy is 0 on the prompt), ``response`` counts response
tokens only. Ratio 1 keeps every candidate, and every row with candidates keeps at least one.

Two keep rules, each a pure function: `keep_top_global` (the top round(r·N) of the N candidates of the batch, at
least one per row: Random, PPL, Rho-1) and `keep_top_per_sample` (the top max(1, round(r·n_i)) of each row's n_i:
FastV, SparseVLM).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtuning.errors import QTuningError
from qtuning.ops.passes import base_model, final_hidden_states, scoring_forward
from qtuning.ops.stats import BatchStats, full_precision
from qtuning.pruning.base import (
    AUTHORS_LOSS_NORM,
    DEFAULT_SCORING,
    PruneDecision,
    PruningPolicy,
    check_ratio,
    loss_positions,
)


def keep_top_global(scores: Tensor, candidates: Tensor, ratio: float) -> Tensor:
    """``[B, T-1]`` bool: the max(round(ratio · N), R) highest-scoring of the N candidates of the batch (ties: lower
    flat index first), where R rows have candidates and each row's best candidate goes first, so every such row
    keeps one. When no row would be left out this is the plain global top round(ratio · N)."""
    masked = scores.masked_fill(~candidates, -math.inf)  # [B, T-1]
    order = torch.sort(masked.flatten(), descending=True, stable=True).indices  # [B·(T-1)]
    has_any = candidates.any(1)  # [B]
    best = torch.zeros_like(candidates)
    best[has_any, masked.argmax(1)[has_any]] = True  # argmax: the first maximum, as the stable sort
    order = order[torch.sort((~best.flatten()[order]).to(torch.uint8), stable=True).indices]  # row bests first
    keep = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    keep[order[: max(round(ratio * int(candidates.sum())), int(has_any.sum()))]] = True
    return keep.view_as(candidates)


def keep_top_per_sample(scores: Tensor, candidates: Tensor, ratio: float) -> Tensor:
    """``[B, T-1]`` bool: per row, the max(1, round(ratio · n_i)) highest-scoring of its n_i candidates (ties: lower
    index first; round half to even, as Python's)."""
    n = candidates.sum(1)  # [B]
    keep_n = torch.minimum(torch.round(ratio * n.double()).long().clamp(min=1), n)  # [B]
    order = torch.sort(scores.masked_fill(~candidates, -math.inf), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)  # [B, T-1] rank of each position within its row, 0 = best
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < keep_n[:, None])


def attention_received(attn: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B, T]`` fp32: the attention each token receives, averaged over heads and over the non-pad queries.

    ``attn`` ``[B, H, T, T]`` is softmax-normalised over keys (last dim); pad tokens receive 0.
    """
    valid = attention_mask.float()  # [B, T]
    per_query = attn.mean(1, dtype=torch.float32) * valid[:, :, None]  # [B, Tq, Tk]: pad queries masked out
    return per_query.sum(1) / valid.sum(1, keepdim=True).clamp(min=1) * valid


def sparsevlm_scores(received: Tensor, hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B, T]``: 0.5 · attention received − 0.5 · mean cosine similarity of a token's hidden state to the other
    non-pad tokens of its sample; 0 at padding."""
    valid = attention_mask.float()  # [B, T]
    unit = F.normalize(hidden.float(), dim=-1) * valid[:, :, None]  # [B, T, H]
    # Σ_j≠i cos(h_i, h_j) = u_i · Σ_j u_j − u_i · u_i: no [B, T, T] similarity matrix
    total = torch.einsum("bth,bh->bt", unit, unit.sum(1)) - (unit * unit).sum(-1)  # [B, T]
    mean_sim = total / (valid.sum(1, keepdim=True) - 1).clamp(min=1)
    return (0.5 * received.float() - 0.5 * mean_sim) * valid


def last_layer_pass(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """No-grad forward under eager attention: the attention received in the last layer (`attention_received`,
    ``[B, T]``) and the final hidden states (``[B, T, H]``, fp32). The model's attention implementation is restored.

    Only the last layer's ``[B, H, T, T]`` map is kept (a hook on its attention module), not one per layer as
    ``output_attentions=True`` would.
    """
    base = base_model(model)
    captured: list[Tensor] = []
    attention = base.get_decoder().layers[-1].self_attn
    hook = attention.register_forward_hook(lambda module, args, out: captured.append(out[1]))
    original = base.config._attn_implementation
    try:
        base.set_attn_implementation("eager")  # sdpa and flash attention return no weights
        with torch.no_grad():
            hidden = final_hidden_states(model, batch)  # [B, T, H]
    finally:
        hook.remove()
        base.set_attn_implementation(original)
    with full_precision(hidden.device):
        return attention_received(captured[-1], batch["attention_mask"]), hidden.float()


def token_decision(stats: BatchStats, token_keep: Tensor, **metrics: float) -> PruneDecision:
    """Every row kept; ``token_keep`` decides the positions. Logs the fraction of response tokens kept."""
    sample_keep = torch.ones(stats.batch_size, dtype=torch.bool, device=token_keep.device)
    n_resp = int(stats.response_mask.sum())
    kept_resp = float((token_keep & stats.response_mask).sum())
    metrics = {"resp_token_keep": kept_resp / n_resp if n_resp else 1.0, **metrics}
    return PruneDecision(sample_keep=sample_keep, token_keep=token_keep, metrics=metrics)


class RandomTokenPolicy(PruningPolicy):
    """Keeps round(r_token · N) of the batch's N candidate positions uniformly at random (the authors' count over the
    whole batch). Its own seeded generator is checkpointed, so a resumed run draws the same positions."""

    def __init__(self, r_token: float, seed: int = 0, loss_norm: str = AUTHORS_LOSS_NORM) -> None:
        super().__init__(loss_norm)
        self.r_token = check_ratio("r_token", r_token)
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, stats: BatchStats) -> PruneDecision:
        candidates = loss_positions(stats, self.loss_norm)  # [B, T-1]
        draws = torch.rand(candidates.shape, generator=self.generator).to(candidates.device)  # [B, T-1]
        return token_decision(stats, keep_top_global(draws, candidates, self.r_token))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])


class PPLTokenPolicy(PruningPolicy):
    """Keeps the round(r_token · N) candidates with the highest NLL across the batch (ties: lower flat index)."""

    needs_scores = True

    def __init__(self, r_token: float, loss_norm: str = AUTHORS_LOSS_NORM, scoring: str = DEFAULT_SCORING) -> None:
        super().__init__(loss_norm, scoring)
        self.r_token = check_ratio("r_token", r_token)

    def select(self, stats: BatchStats) -> PruneDecision:
        candidates = loss_positions(stats, self.loss_norm)  # [B, T-1]
        return token_decision(stats, keep_top_global(stats.token_nll, candidates, self.r_token))


class FastVTokenPolicy(PruningPolicy):
    """FastV (Chen et al. 2024): keeps, per sample, the max(1, round(r_token · n)) candidates whose target token
    receives the most attention in the last layer (mean over heads and non-pad queries). An extra no-grad forward
    under eager attention gives the map; position i predicts token i + 1, so it is scored by token i + 1."""

    def __init__(self, r_token: float, loss_norm: str = AUTHORS_LOSS_NORM) -> None:
        super().__init__(loss_norm)
        self.r_token = check_ratio("r_token", r_token)

    def enrich(self, model: torch.nn.Module, batch: dict[str, Tensor], stats: BatchStats) -> BatchStats:
        """``stats.token_scores`` from the last-layer pass (none needed at ratio 1): position i is scored by its
        target token i + 1."""
        if self.r_token >= 1.0:
            return stats
        return replace(stats, token_scores=self.target_scores(model, batch)[:, 1:])  # [B, T-1]

    def target_scores(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """``[B, T]`` score of each token from the last-layer pass."""
        received, _ = last_layer_pass(model, batch)
        return received

    def select(self, stats: BatchStats) -> PruneDecision:
        candidates = loss_positions(stats, self.loss_norm)  # [B, T-1]
        if self.r_token >= 1.0:
            return token_decision(stats, candidates)
        if stats.token_scores is None:
            raise ValueError(f"{type(self).__name__} needs stats.token_scores: call enrich(model, batch, stats)")
        return token_decision(stats, keep_top_per_sample(stats.token_scores, candidates, self.r_token))


class SparseVLMTokenPolicy(FastVTokenPolicy):
    """SparseVLM-style score (`sparsevlm_scores`): 0.5 · last-layer attention received − 0.5 · mean cosine similarity
    of the token's final hidden state to the other tokens of its sample; keeps the top r_token per sample.

    The authors' code differs in two ways. It computed the loss on the *lowest*-scoring tokens (it put the "prune"
    set into the selection mask), which looks inverted: ``inverted=True`` reproduces that. It also ignored r_token and
    kept L − rank(mean attention matrix) tokens; here r_token sets the count, so budgets compare with the other
    pruners.
    """

    def __init__(self, r_token: float, inverted: bool = False, loss_norm: str = AUTHORS_LOSS_NORM) -> None:
        super().__init__(r_token, loss_norm)
        self.inverted = bool(inverted)

    def target_scores(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        received, hidden = last_layer_pass(model, batch)
        with full_precision(hidden.device):  # autocast would run its einsum in bf16
            scores = sparsevlm_scores(received, hidden, batch["attention_mask"])  # [B, T]
        return -scores if self.inverted else scores


def check_same_vocab(ref_tokenizer: Any, train_tokenizer: Any, ref_model: str) -> None:
    """The excess loss compares the two models' NLL of the same token ids, so both must share one vocabulary."""
    if ref_tokenizer.get_vocab() != train_tokenizer.get_vocab():
        raise QTuningError(
            f"pruner.token.ref_model={ref_model}: its tokenizer ({len(ref_tokenizer)} tokens) differs from the "
            f"training tokenizer {train_tokenizer.name_or_path or type(train_tokenizer).__name__} "
            f"({len(train_tokenizer)} tokens); the reference model must use the same tokenizer"
        )


class Rho1TokenPolicy(PruningPolicy):
    """Rho-1 (Lin et al. 2024): keeps the round(r_token · N) candidates with the largest excess loss, the current
    model's NLL minus a reference model's, across the batch (ties: lower flat index).

    Args:
        r_token: the fraction of the batch's candidate positions kept.
        ref_model: a Hugging Face model directory with the training tokenizer's vocabulary; loaded frozen in `setup`.
        loss_norm: ``nonpad`` (authors) or ``response`` candidates.
        scoring: ``separate`` or ``shared`` (see `PruningPolicy.scoring`).
        reference: an already-built reference module (tests); it replaces ``ref_model``.
    """

    needs_scores = True

    def __init__(
        self,
        r_token: float,
        ref_model: str | None = None,
        loss_norm: str = AUTHORS_LOSS_NORM,
        scoring: str = DEFAULT_SCORING,
        reference: torch.nn.Module | None = None,
    ) -> None:
        super().__init__(loss_norm, scoring)
        self.r_token = check_ratio("r_token", r_token)
        if ref_model is None and reference is None:
            raise ValueError("Rho1TokenPolicy needs a reference model: set pruner.token.ref_model to a model directory")
        self.ref_model = ref_model
        self.reference = reference

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Load the reference once, frozen and in eval mode, on the training device and in the model's dtype."""
        if self.reference is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        train_tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if train_tokenizer is None:
            raise ValueError("Rho1TokenPolicy checks the reference's tokenizer against trainer.datamodule.tokenizer")
        try:
            ref_tokenizer = AutoTokenizer.from_pretrained(self.ref_model)
            check_same_vocab(ref_tokenizer, train_tokenizer, self.ref_model)
            dtype = next(pl_module.model.parameters()).dtype
            reference = AutoModelForCausalLM.from_pretrained(self.ref_model, dtype=dtype)
        except OSError as err:
            raise QTuningError(f"pruner.token.ref_model={self.ref_model}: cannot load it: {err}") from None
        self.reference = reference.requires_grad_(False).eval().to(pl_module.device)

    def select(self, stats: BatchStats) -> PruneDecision:
        candidates = loss_positions(stats, self.loss_norm)  # [B, T-1]
        if self.r_token >= 1.0:
            return token_decision(stats, candidates)
        if stats.ref_nll is None:
            raise ValueError("Rho1TokenPolicy needs stats.ref_nll: call enrich(model, batch, stats)")
        excess = stats.token_nll - stats.ref_nll  # [B, T-1], 0 on the prompt
        keep = keep_top_global(excess, candidates, self.r_token)
        n_kept = int((keep & stats.response_mask).sum())
        mean_excess = float((excess * (keep & stats.response_mask)).sum()) / n_kept if n_kept else 0.0
        return token_decision(stats, keep, kept_excess=mean_excess)

    def enrich(self, model: torch.nn.Module, batch: dict[str, Tensor], stats: BatchStats) -> BatchStats:
        """``stats.ref_nll``: the reference model's NLL of the batch (none needed at ratio 1)."""
        if self.r_token >= 1.0:
            return stats
        if self.reference is None:
            raise ValueError("Rho1TokenPolicy: the reference model is loaded in setup(); none is loaded yet")
        return replace(stats, ref_nll=scoring_forward(self.reference, batch).token_nll)
