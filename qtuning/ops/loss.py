"""The training and validation loss from the final hidden states: the LM head in chunks, only where a position counts.

``Σ ce·w`` over the response positions with a weight ``w ≠ 0``, cross-entropy in fp32 under any precision, and never
more than one chunk of ``[c, V]`` logits at once, forward or backward. Two ways, the same gradient:
- fused (when the head is a plain ``nn.Linear`` whose whole weight is at hand): each chunk's gradients with respect to
  the hidden states and the head are computed in the forward pass and the logits freed at once, as Liger's fused
  linear cross-entropy does; no logits are recomputed;
- checkpointed (any other head: adapter-wrapped, soft-capped, or sharded by FSDP or ZeRO-3, whose weight is only
  whole inside its own forward): the head is called as a module on each chunk, and each chunk's logits are
  recomputed in the backward pass (activation checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtuning.ops.stats import chunk_positions, full_precision, shift_targets


@dataclass
class OutputHead:
    """A model's output layer as a function of ``[c, H]`` hidden states (`qtuning.ops.passes.output_head`)."""

    module: torch.nn.Module
    vocab_size: int
    softcap: float | None = None  # a final logit soft-cap (Gemma 2's final_logit_softcapping), as the model applies it

    def __call__(self, hidden: Tensor) -> Tensor:
        logits = self.module(hidden)
        return logits if not self.softcap else self.softcap * torch.tanh(logits / self.softcap)

    def plain_linear(self) -> torch.nn.Linear | None:
        """The head as a plain ``nn.Linear`` whose whole weight is at hand (not sharded, no adapter, no soft-cap),
        which the fused loss may use directly; None otherwise."""
        module = self.module
        if type(module) is not torch.nn.Linear or self.softcap:
            return None
        return module if module.weight.shape == (module.out_features, module.in_features) else None


def _cross_entropy(head: OutputHead, hidden: Tensor, targets: Tensor) -> Tensor:
    """``[c]`` fp32 cross-entropy of ``targets`` under the logits of ``hidden`` ``[c, H]``."""
    logits = head(hidden)  # [c, V] in the head's (or autocast's) dtype
    with full_precision(logits.device):
        return F.cross_entropy(logits.float(), targets, reduction="none")


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``(Σ w·ce, ce)`` of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk, with every gradient
    computed in the forward pass (one ``[c, V]`` chunk of logits at a time) and scaled in the backward pass.

    The matmuls run in the autocast dtype when autocast is on (else the weight's), the softmax and the sums in fp32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V, H]
        bias: Tensor | None,  # [V]
        targets: Tensor,  # [N] long
        position_weight: Tensor,  # [N] fp32
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        device = hidden.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        with full_precision(device):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            ce = torch.empty(hidden.shape[0], dtype=torch.float32, device=device)  # [N]
            grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_weight else None
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device) if need_bias else None
            for start in range(0, hidden.shape[0], chunk_size):
                chunk = slice(start, start + chunk_size)
                h, t = hidden[chunk].to(dtype), targets[chunk]  # [c, H], [c]
                weights = position_weight[chunk, None].to(dtype)  # [c, 1]
                log_probs = torch.log_softmax(F.linear(h, w, b).float(), dim=-1)  # [c, V]
                ce[chunk] = -log_probs.gather(1, t[:, None]).squeeze(1)
                # d ce / d logits = softmax − one-hot, made in place of the log-probabilities; the position weights
                # scale the [c, H] and [c] sides of the matmuls below instead of the [c, V] gradient
                grad = log_probs.exp_()
                grad[torch.arange(t.numel(), device=device), t] -= 1
                grad = grad.to(dtype)  # [c, V]
                if grad_hidden is not None:
                    grad_hidden[chunk] = (grad @ w) * weights
                if grad_weight is not None and dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h * weights)  # in place: no [V, H] temporary per chunk
                elif grad_weight is not None:
                    grad_weight += (grad.t() @ (h * weights)).float()
                if grad_bias is not None:
                    grad_bias += (grad.t() @ weights).squeeze(1).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(ce)
        return (ce * position_weight).sum(), ce

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, grad_ce: Tensor) -> tuple[Tensor | None, ...]:
        grads = [
            None if grad is None else (grad * grad_loss).to(dtype)
            for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None)


def token_loss(
    hidden_states: Tensor,
    head: OutputHead,
    labels: Tensor,
    attention_mask: Tensor,
    weight: Tensor | None = None,
    chunk_size: int | None = None,
    fused: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """``(loss_sum, ce)``: ``Σ ce·w`` with autograd through ``hidden_states`` ``[B, T, H]`` and the head, and the
    ``[B, T-1]`` fp32 cross-entropy (detached, 0 where it was not computed).

    ``weight`` ``[B, T-1]`` (None: 1 at every response position) weighs each position; the head runs only at response
    positions whose weight is not 0. When none is, one position goes through with weight 0, so that every parameter
    still takes part in the backward pass (DDP's all-reduce). ``fused``: None picks the fused way wherever the head
    allows it (see the module's docstring).
    """
    targets, response_mask, _ = shift_targets(labels, attention_mask)
    if weight is None:
        weight = response_mask.float()
    rows, cols = (response_mask & (weight != 0)).nonzero(as_tuple=True)  # [N], [N]
    position_weight = weight[rows, cols].float()  # [N]
    if rows.numel() == 0:
        rows = cols = torch.zeros(1, dtype=torch.long, device=targets.device)
        position_weight = torch.zeros(1, device=targets.device)
    chunk_size = chunk_size or chunk_positions(head.vocab_size, targets.device)
    hidden = hidden_states[rows, cols]  # [N, H]: one gather, one scatter in the backward pass
    wanted = targets[rows, cols].clamp(min=0)  # [N]
    linear = head.plain_linear() if fused is not False else None
    if fused and linear is None:
        raise ValueError(f"the fused loss needs a plain nn.Linear head, not {type(head.module).__name__}")
    trainable = hidden.requires_grad or any(p.requires_grad for p in head.module.parameters())
    chunks = list(zip(hidden.split(chunk_size), wanted.split(chunk_size), strict=True))
    if not (torch.is_grad_enabled() and trainable):
        with torch.no_grad():
            values = torch.cat([_cross_entropy(head, h, t) for h, t in chunks])
        loss_sum = (values * position_weight).sum()
    elif linear is not None:
        loss_sum, values = FusedLinearCrossEntropy.apply(
            hidden, linear.weight, linear.bias, wanted, position_weight, chunk_size
        )
    else:
        from torch.utils.checkpoint import checkpoint

        # split, not slices: the backward pass of a split is one concatenation, not a zero-filled copy per chunk
        values = torch.cat([checkpoint(_cross_entropy, head, h, t, use_reentrant=False) for h, t in chunks])
        loss_sum = (values * position_weight).sum()
    ce = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)  # [B, T-1]
    ce[rows, cols] = values.detach() * (position_weight != 0)  # the stand-in position of an empty step stays 0
    return loss_sum, ce
