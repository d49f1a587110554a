"""`SFTModule`: the LightningModule that orchestrates one pruned SFT step.

Per training step:
1. ``BatchStats`` of the batch: masks only, or, when the policy needs scores, a no-grad scoring forward.
2. ``decision = policy.select(policy.enrich(model, batch, stats))``.
3. Forward + backward over the kept rows only, re-padded to their own longest length (the compute saving).
4. Loss ``Σ ce·w / max(1, Σ w)``, token-normalised across gradient accumulation and devices: the step returns the
   sum ``Σ ce·w`` and the gradients are divided by the window's ``Σ w`` just before the optimizer step.

A policy that decides per window (``threshold_scope=window``) gets one decision per optimizer step instead: the
module then trains each accumulation window itself (manual optimization, `window_step`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor
from torchmetrics import MeanMetric

from qtuning import TOKEN_TOTALS
from qtuning.errors import QTuningError
from qtuning.pruning import BatchStats, PruneDecision, PruningPolicy, shift_targets, token_loss
from qtuning.pruning.passes import (
    Batch,
    final_hidden_states,
    length_groups,
    output_head,
    scoring_forward,
    select_rows,
)
from qtuning.pruning.stats import concat_stats
from qtuning.resume import NonFiniteLossError

log = logging.getLogger(__name__)


def response_tokens(batch: Batch, rows: Tensor, weight: Tensor) -> int:
    """The response positions of ``rows`` ``[K]`` with a loss weight ``[K, T'-1]`` (the rows re-padded to their own
    length): the tokens a step learns from. ``Σ w`` also counts the prompt positions a ``loss_norm: nonpad`` token
    pruner keeps, whose loss is 0."""
    response = shift_targets(batch["labels"][rows], batch["attention_mask"][rows])[1]  # [K, T-1]
    return int((response[:, : weight.shape[1]] & (weight > 0)).sum())


def row_mean_loss(ce: Tensor, weight: Tensor) -> Tensor:
    """``[K]``: each row's mean loss over the positions that count (``ce``, ``weight`` ``[K, T'-1]``), what
    dataset-level pruners such as InfoBatch score samples by."""
    return (ce * weight).sum(1) / weight.sum(1).clamp(min=1)


def zero_for_every_parameter(model: torch.nn.Module) -> Tensor:
    """A loss of 0 whose backward gives every trainable parameter a gradient of 0: a skipped micro-batch's stand-in
    that still fires DDP's gradient hooks, so this device joins the all-reduce the others wait in."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


class KeptForward(NamedTuple):
    """One training forward: the loss sum, per-token cross-entropy and loss weights of the rows that went through it."""

    loss_sum: Tensor  # Σ ce·w·loss_scale, with autograd
    ce: Tensor  # [K, T'-1] fp32, detached; 0 where it was not computed
    weight: Tensor  # [K, T'-1] 1 where the position counts in the loss denominator, 0 elsewhere
    rows: Tensor  # [K] the batch rows they are
    stats: BatchStats
    decision: PruneDecision
    fwd_tokens: int  # positions (padding included) through all forward passes


class SFTModule(LightningModule):
    """Causal-LM fine-tuning under a `PruningPolicy`.

    Args:
        model: a Hugging Face causal LM (optionally peft-wrapped).
        policy: decides, per batch, which rows and positions count.
        optimizer: partial of a torch optimizer, called with the trainable parameters.
        scheduler: partial called with ``(optimizer, total_steps=...)`` returning a per-step LR scheduler, or None.
        max_bad_steps: micro-batches in a row with a non-finite loss before the run stops (each one is skipped).
        gradient_clip_val: the gradient-norm clip of a window the module trains itself (a policy that
            `decides_per_window`: Lightning clips only under automatic optimization); None or 0: no clipping.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        policy: PruningPolicy,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        max_bad_steps: int = 10,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        # One decision per optimizer step: each training batch is a whole window, accumulated here (`window_step`).
        self.automatic_optimization = not policy.decides_per_window
        self.gradient_clip_val = gradient_clip_val
        if max_bad_steps < 1:
            raise QTuningError(f"max_bad_steps={max_bad_steps} must be at least 1")
        self.max_bad_steps = max_bad_steps
        self.bad_steps_in_a_row = 0
        self.bad_steps = 0
        self.model = model
        self.policy = policy
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_loss = MeanMetric()  # weighted by response tokens: the token-level mean over the whole split
        self._window_loss_sum = torch.zeros(())
        self._window_tokens = torch.zeros(())
        self._window_input_tokens = 0
        # forward and backward positions, and response tokens learnt from, of this device's micro-batches in the window
        self._window_positions = [0, 0, 0]
        self.token_totals = dict.fromkeys(TOKEN_TOTALS, 0)  # checkpointed: a resumed run ends with the same totals
        self.total_steps: int | None = None  # optimizer steps of the whole run as planned (the LR schedule's length)
        self._step_started: float | None = None

    # ---- training ---------------------------------------------------------------------------------------------

    def forward_kept(self, batch: Batch) -> KeptForward:
        """Decide, then forward the rows that count.

        ``separate``: a no-grad scoring pass, then a grad forward over the kept rows only (re-padded).
        ``shared``: one grad forward over the whole batch, statistics from its detached hidden states, pruning by
        mask. Either way the loss comes from the LM head at the kept response positions only, in chunks.
        """
        labels, mask = batch["labels"], batch["attention_mask"]
        head = output_head(self.model)
        if self.policy.needs_scores and self.policy.scoring == "shared":
            hidden = final_hidden_states(self.model, batch)  # [B, T, H]
            stats = BatchStats.from_hidden_states(hidden, head, head.vocab_size, labels, mask, batch["sample_idx"])
            stats = self.policy.enrich(self.model, batch, stats)
            decision = self.policy.select(stats)
            rows = torch.arange(stats.batch_size, device=hidden.device)
            weight = decision.token_keep.float()  # [B, T-1]
            loss_sum, ce = token_loss(hidden, head, labels, mask, self.loss_weight(weight, decision, rows))
            return KeptForward(loss_sum, ce, weight, rows, stats, decision, batch["input_ids"].numel())
        if self.policy.needs_scores:
            stats = scoring_forward(self.model, batch)
        else:
            stats = BatchStats.from_masks(labels, mask, batch["sample_idx"])
        stats = self.policy.enrich(self.model, batch, stats)
        decision = self.policy.select(stats)
        rows = decision.sample_keep.nonzero().squeeze(1)  # [K]
        loss_sum, ce, weight, rows, positions = self.train_rows(batch, rows, decision)
        scored = batch["input_ids"].numel() if self.policy.needs_scores else 0
        return KeptForward(loss_sum, ce, weight, rows, stats, decision, scored + positions)

    def train_rows(
        self, batch: Batch, rows: Tensor, decision: PruneDecision
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """A grad forward over ``rows`` ``[K]`` of ``batch``, re-padded to their own longest sequence: the loss sum,
        ``ce`` and ``weight`` ``[K, T'-1]``, the rows, and the positions that went through.

        No row (a global or window decision may leave a device nothing): one row goes through with weight 0, so the
        step contributes 0 and every device still joins the gradient all-reduce.
        """
        if rows.numel() == 0:
            rows = torch.zeros(1, dtype=torch.long, device=rows.device)
        kept = select_rows(batch, rows)
        hidden = final_hidden_states(self.model, kept)  # [K, T', H]
        weight = decision.token_keep[rows, : hidden.shape[1] - 1].float()  # [K, T'-1]
        head, labels, mask = output_head(self.model), kept["labels"], kept["attention_mask"]
        loss_sum, ce = token_loss(hidden, head, labels, mask, self.loss_weight(weight, decision, rows))
        return loss_sum, ce, weight, rows, kept["input_ids"].numel()

    @staticmethod
    def loss_weight(weight: Tensor, decision: PruneDecision, rows: Tensor) -> Tensor:
        """``[K, T'-1]``: the weight of each position in the loss sum; a per-sample scale (InfoBatch's 1/r) rescales
        the loss, not the token count of the denominator."""
        return weight if decision.loss_scale is None else weight * decision.loss_scale[rows, None]

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any] | None:
        """The loss sum of the micro-batch, and what the step made for callbacks (`on_train_batch_end`'s
        ``outputs``): ``stats``, ``decision``, and ``row_losses`` (``[K]`` sample_idx, ``[K]`` mean loss of each
        kept row, what dataset-level pruners such as InfoBatch score samples by)."""
        if not self.automatic_optimization:
            return self.window_step(batch, batch_idx)
        if self._step_started is None:
            self._step_started = time.perf_counter()
        loss_sum, ce, weight, rows, stats, decision, fwd_tokens = self.forward_kept(batch)
        if not torch.isfinite(loss_sum):
            return self.skip_nonfinite(batch_idx)
        self.bad_steps_in_a_row = 0
        bwd_tokens = ce.shape[0] * (ce.shape[1] + 1)
        self.add_to_window(loss_sum, weight.sum(), (fwd_tokens, bwd_tokens, response_tokens(batch, rows, weight)))
        self._window_input_tokens += int(batch["attention_mask"].sum())
        self.log_decision(stats, decision, fwd_tokens, bwd_tokens)
        # Lightning divides the loss by accumulate_grad_batches; on_before_optimizer_step undoes that.
        row_losses = (batch["sample_idx"][rows], row_mean_loss(ce, weight))
        return {"loss": loss_sum, "stats": stats, "decision": decision, "row_losses": row_losses}

    def window_step(self, batch: Batch, batch_idx: int) -> dict[str, Any] | None:
        """One optimizer step over ``batch``, this device's whole accumulation window (manual optimization):

        1. no-grad scoring passes over its micro-batches of ``data.batch_size`` rows, their statistics as one;
        2. one decision over the window of every device (`policy.select` gathers them);
        3. the kept rows, grouped by length, in training micro-batches of at most ``data.batch_size`` rows: forward
           and backward each, the gradients synchronised across devices at the last one only;
        4. the optimizer step (`on_before_optimizer_step` normalises by the window's loss tokens and clips).

        Returns what `training_step` does, over the window: its statistics ``[W, T-1]``, the decision and the kept
        rows' losses; None when every micro-batch had a non-finite loss.
        """
        self._step_started = time.perf_counter()
        stats, decision, groups, scored = self.decide_window(batch, self.trainer.datamodule.batch_size)
        trained, losses = 0, []
        for i, group in enumerate(groups):
            # DDP all-reduces the accumulated gradients once, at the window's last backward pass
            with nullcontext() if i == len(groups) - 1 else self.gradient_sync_off():
                loss_sum, ce, weight, rows, positions = self.train_rows(batch, group, decision)
                if not torch.isfinite(loss_sum):
                    self.skip_nonfinite(batch_idx)
                    if i == len(groups) - 1:  # the other devices wait in this backward's all-reduce: join it with 0
                        self.manual_backward(zero_for_every_parameter(self.model))
                    continue
                self.manual_backward(loss_sum)
            self.bad_steps_in_a_row = 0
            self.add_to_window(loss_sum, weight.sum(), (positions, positions, response_tokens(batch, rows, weight)))
            trained += positions
            losses.append((batch["sample_idx"][rows], row_mean_loss(ce, weight)))
        self._window_input_tokens += int(batch["attention_mask"].sum())
        self._window_positions[0] += scored
        self.log_decision(stats, decision, scored + trained, trained)
        window_loss_sum = self._window_loss_sum  # the step below starts the next window's sums
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if not losses:
            return None
        row_losses = (torch.cat([idx for idx, _ in losses]), torch.cat([loss for _, loss in losses]))
        return {"loss": window_loss_sum, "stats": stats, "decision": decision, "row_losses": row_losses}

    def decide_window(self, batch: Batch, micro: int) -> tuple[BatchStats, PruneDecision, list[Tensor], int]:
        """What `window_step` does before training: the window's statistics ``[W, T-1]`` from scoring passes over its
        micro-batches of ``micro`` rows, the decision, the kept rows in training groups of at most ``micro`` (one
        empty group when none is kept: its stand-in row still joins the all-reduce, see `train_rows`), and the
        positions the scoring passes went through."""
        parts, scored = [], 0
        for chunk in torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device).split(micro):
            sub = select_rows(batch, chunk)
            parts.append(self.policy.enrich(self.model, sub, scoring_forward(self.model, sub)))
            scored += sub["input_ids"].numel()
        stats = concat_stats(parts)  # [W, T-1]
        decision = self.policy.select(stats)
        return stats, decision, length_groups(decision.sample_keep, stats.nonpad_mask.sum(1), micro), scored

    def gradient_sync_off(self) -> AbstractContextManager:
        """A region whose backward passes only accumulate gradients locally (DDP's ``no_sync``)."""
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext()

    def add_to_window(self, loss_sum: Tensor, loss_tokens: Tensor, positions: tuple[int, int, int]) -> None:
        """Add one trained micro-batch to the window's sums: ``Σ ce·w``, ``Σ w``, forward and backward positions and
        the response tokens learnt from."""
        self._window_loss_sum = self._window_loss_sum.to(loss_sum.device) + loss_sum.detach()
        self._window_tokens = self._window_tokens.to(loss_sum.device) + loss_tokens
        self._window_positions = [done + more for done, more in zip(self._window_positions, positions, strict=True)]

    def log_decision(self, stats: BatchStats, decision: PruneDecision, fwd_tokens: int, bwd_tokens: int) -> None:
        """The decision's per-step scalars, and the positions (padding included) through all forward passes and
        through the backward pass."""
        self.log_dict(
            {
                "prune/kept_samples": decision.sample_keep.float().mean(),
                "prune/kept_tokens": decision.token_keep.sum() / stats.nonpad_mask.sum().clamp(min=1),
                "prune/fwd_tokens": float(fwd_tokens),
                "prune/bwd_tokens": float(bwd_tokens),
                **{f"prune/{k}": float(v) for k, v in decision.metrics.items()},
            },
            on_step=True,
            on_epoch=False,
            batch_size=stats.batch_size,
        )

    def skip_nonfinite(self, batch_idx: int) -> None:
        """A non-finite loss: no backward pass, nothing accumulated (returning None skips the micro-batch)."""
        self.bad_steps += 1
        self.bad_steps_in_a_row += 1
        self.log("train/nonfinite_skipped", float(self.bad_steps), on_step=True, on_epoch=False)
        log.warning("non-finite loss at batch %d: skipped (%d in a row)", batch_idx, self.bad_steps_in_a_row)
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"max_bad_steps={self.max_bad_steps}: {self.bad_steps_in_a_row} micro-batches in a row had a "
                "non-finite loss (lower optimizer.lr, or use model.dtype=fp32); the last finite state is saved"
            )
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the summed gradients by the loss tokens of the whole accumulation window, over all devices."""
        reduce = self.trainer.strategy.reduce
        tokens = reduce(self._window_tokens.clone(), reduce_op="sum")
        loss_sum = reduce(self._window_loss_sum.clone(), reduce_op="sum")
        positions = reduce(torch.tensor(self._window_positions, device=tokens.device), reduce_op="sum")  # [3] int64
        for key, value in zip(TOKEN_TOTALS, [round(float(tokens)), *positions.tolist()], strict=True):
            self.token_totals[key] += value
        # DDP averaged the gradients over devices and Lightning divided them by the accumulation count (1 when the
        # module trains the window itself).
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens.clamp(min=1)
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
        if not self.automatic_optimization and self.gradient_clip_val:  # Lightning clips after this hook otherwise
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        self.log_dict(
            {
                "train/loss": loss_sum / tokens.clamp(min=1),
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/loss_tokens": tokens,
                "train/tokens_per_s": self._window_input_tokens / max(elapsed, 1e-9),
            },
            on_step=True,
            on_epoch=False,
            prog_bar=True,
        )
        self._window_loss_sum = torch.zeros((), device=loss_sum.device)
        self._window_tokens = torch.zeros((), device=loss_sum.device)
        self._window_input_tokens = 0
        self._window_positions = [0, 0, 0]
        self._step_started = None

    # ---- validation: never pruned -----------------------------------------------------------------------------

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        hidden = final_hidden_states(self.model, batch)  # [B, T, H]
        loss_sum, _ = token_loss(hidden, output_head(self.model), batch["labels"], batch["attention_mask"])
        n_tokens = shift_targets(batch["labels"], batch["attention_mask"])[1].sum()
        if n_tokens > 0:
            self.val_loss.update(loss_sum / n_tokens, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss)}, prog_bar=True, sync_dist=False)

    # ---- checkpoints: frozen weights (the base model under LoRA) are rebuilt from the config, not saved ---------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        checkpoint["token_totals"] = dict(self.token_totals)
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        if frozen:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
            checkpoint["frozen_weights_omitted"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:  # dropout and any other global draw continue where they were
            torch.set_rng_state(checkpoint["rng_states"]["torch"])
            random.setstate(checkpoint["rng_states"]["python"])
        self.token_totals.update(checkpoint.get("token_totals", {}))
        if checkpoint.get("frozen_weights_omitted"):
            checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

    # ---- optimisation ------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        self.total_steps = self.planned_total_steps()
        if self.scheduler_factory is None:
            return optimizer
        if self.total_steps is None:
            raise ValueError("the LR schedule needs a finite run length: set trainer.max_steps or trainer.max_epochs")
        scheduler = self.scheduler_factory(optimizer, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def planned_total_steps(self) -> int | None:
        """The run's length in optimizer steps, the one place it is answered: the steps taken so far, plus for this
        epoch and every later one its planned batches over the accumulation (Lightning steps at an epoch's end even
        when the window is short), capped by max_steps; None without any limit.

        Asked only where an epoch starts whole: in `configure_optimizers` (a resumed run then restores the schedule's
        own length from its checkpoint) and in `on_train_epoch_start` (which Lightning skips when it resumes in the
        middle of an epoch). Not `estimated_stepping_batches`: that builds a train loader early, and a resumed run
        could then not restore the loader's position."""
        trainer = self.trainer
        batches = trainer.datamodule.planned_batches(trainer.current_epoch)
        if batches is None:  # no epoch limit
            return trainer.max_steps if trainer.max_steps > 0 else None
        total = trainer.global_step + sum(math.ceil(b / trainer.accumulate_grad_batches) for b in batches)
        return min(total, trainer.max_steps) if trainer.max_steps > 0 else total

    def on_train_epoch_start(self) -> None:
        """Under a dataset-level sample pruner the epochs differ in length (InfoBatch): the run's end, and the
        schedule's, moves with the plan of the epoch starting now."""
        self.total_steps = self.planned_total_steps()
        schedulers = self.lr_schedulers()
        scheduler = schedulers[0] if isinstance(schedulers, list) else schedulers
        if self.total_steps is not None and hasattr(scheduler, "total_steps"):
            scheduler.total_steps = self.total_steps
