"""`SFTModule`: one pruned SFT step as one pipeline.

Each training batch holds the rows of one decision (`StepScope`): a micro-batch of this device (``local``, and
``global``, where every device's micro-batch is decided together), or every micro-batch of the optimizer step
(``window``). `training_step` runs, top to bottom:

1. `score`: the rows' `BatchStats`, from a no-grad scoring pass per micro-batch (``scoring: separate``), from one grad
   forward that is also the training forward (``shared``), or from the masks alone (a policy that needs no scores);
2. `decide`: ``policy.select(stats)``, over every device's statistics when the scope spans devices (gathered here, so
   that a policy stays a pure function of what it is given);
3. `train_kept`: forward and backward over the kept rows only, in micro-batches of rows of similar length, the loss
   ``Σ ce·w`` from the LM head in chunks;
4. the optimizer step: the gradients of ``Σ ce·w`` divided by the step's loss tokens ``Σ w`` over all devices
   (`StepSums`, `gradient_scale`), clipped, stepped. Under ``local`` and ``global`` scope backward, accumulation,
   clipping and stepping are Lightning's (automatic optimization); a ``window`` is trained here (manual optimization),
   its gradients synchronised across devices at its last backward pass only.

A pass whose backward synchronises the devices (the last of a step; under FSDP2, `qtuning.sharding`, every one) is
trained by every device or skipped by every device: its loss's finiteness is agreed first, and a skipped pass's
stand-in (a loss of 0) still joins the synchronisation. ``max_bad_steps`` is agreed too, so that no device is left
waiting for one that stopped.

Every pass (scoring, training, validation) lays out its rows through `Layout` (right-padded, or packed under
``data.padding_free``); its statistics and losses come back in the samples' own layout, so that steps 2 to 4 read the
same either way.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy, ParallelStrategy
from torch import Tensor
from torchmetrics import MeanMetric

from qtuning import TOKEN_TOTALS
from qtuning.errors import QTuningError
from qtuning.ops import (
    Batch,
    BatchStats,
    Layout,
    PassRows,
    any_device,
    concat_stats,
    final_hidden_states,
    finite_on_every_device,
    gather_stats,
    length_groups,
    most_on_any_device,
    output_head,
    packing_problem,
    scoring_forward,
    select_rows,
    shift_targets,
    token_loss,
    world_size,
)
from qtuning.pruning import PruneDecision, PruningPolicy
from qtuning.resume import NonFiniteLossError
from qtuning.sharding import is_sharded, shard_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepScope:
    """Over which rows one decision is made, set once for the run from ``pruner.threshold_scope``, the micro-batch
    (``data.batch_size``) and ``trainer.accumulate_grad_batches``."""

    threshold_scope: str = "local"
    micro_batch: int | None = None  # rows per forward and backward pass; None: a training batch's rows
    accumulation: int = 1  # micro-batches per optimizer step

    @property
    def window(self) -> int:
        """Micro-batches per decision, and so per training batch: the whole accumulation under ``window``, else 1."""
        return self.accumulation if self.threshold_scope == "window" else 1

    @property
    def across_devices(self) -> bool:
        """Whether one decision covers every device's rows (``global``, ``window``)."""
        return self.threshold_scope != "local"

    @property
    def manual(self) -> bool:
        """Whether the module trains each training batch itself (every ``window``, one micro-batch long included)."""
        return self.threshold_scope == "window"


@dataclass
class Scored:
    """Step 1's outcome for a training batch."""

    stats: BatchStats  # [W, T-1] what the policy decides from
    hidden: Tensor | None  # [R, L, H] with autograd under shared scoring: the training forward too; else None
    shared: PassRows | None  # the rows of that forward, as it ran them
    positions: int  # positions (padding included) through the scoring passes


@dataclass
class Trained:
    """One training pass over some rows of a training batch."""

    loss_sum: Tensor  # Σ ce·w·loss_scale, with autograd
    ce: Tensor  # [K, T'-1] fp32, detached; 0 where it was not computed
    weight: Tensor  # [K, T'-1] 1 where the position counts in the loss denominator, 0 elsewhere
    rows: Tensor  # [K] the training batch's rows they are
    forward_positions: int  # positions through this pass's own forward (0: the scoring forward was it)
    backward_positions: int  # positions through its backward

    def response_tokens(self, batch: Batch) -> int:
        """The response positions with a loss weight: the tokens the pass learns from. ``Σ w`` also counts the prompt
        positions a ``loss_norm: nonpad`` token pruner keeps, whose loss is 0."""
        response = shift_targets(batch["labels"][self.rows], batch["attention_mask"][self.rows])[1]  # [K, T-1]
        return int((response[:, : self.weight.shape[1]] & (self.weight > 0)).sum())

    def row_losses(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``([K] sample_idx, [K] mean loss of each row over the positions that count)``: what dataset-level pruners
        such as InfoBatch score samples by."""
        mean = (self.ce * self.weight).sum(1) / self.weight.sum(1).clamp(min=1)
        return batch["sample_idx"][self.rows], mean


@dataclass
class StepTotals:
    """One optimizer step's sums over every device."""

    loss_sum: Tensor  # Σ ce·w
    loss_tokens: Tensor  # Σ w, the loss denominator
    nll_sum: Tensor  # Σ ce over the response tokens learnt from (no weight, no loss scale)
    forward_positions: int
    backward_positions: int
    response_tokens: int
    passes: int  # the training passes that were not skipped


class StepSums:
    """This device's running sums over the micro-batches of one optimizer step, cleared by the step (`reset`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros(())  # Σ ce·w
        self.loss_tokens = torch.zeros(())  # Σ w
        self.nll_sum = torch.zeros(())  # Σ ce over the response tokens learnt from
        self.forward_positions = 0
        self.backward_positions = 0
        self.response_tokens = 0
        self.passes = 0
        self.input_tokens = 0  # the non-pad tokens of the training batches (for tokens/s)
        self.started: float | None = None  # when the step's first training batch began

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def add_batch(self, batch: Batch, scored: Scored) -> None:
        self.input_tokens += int(batch["attention_mask"].sum())
        self.forward_positions += scored.positions

    def add_pass(self, trained: Trained, batch: Batch) -> None:
        self.loss_sum = self.loss_sum.to(trained.loss_sum.device) + trained.loss_sum.detach()
        self.loss_tokens = self.loss_tokens.to(trained.loss_sum.device) + trained.weight.sum()
        self.nll_sum = self.nll_sum.to(trained.ce.device) + trained.ce.sum()
        self.forward_positions += trained.forward_positions
        self.backward_positions += trained.backward_positions
        self.response_tokens += trained.response_tokens(batch)
        self.passes += 1

    def reduce(self, strategy: Any, device: torch.device) -> StepTotals:
        """The sums of every device (a sum all-reduce)."""
        loss_sum = strategy.reduce(self.loss_sum.to(device, copy=True), reduce_op="sum")
        loss_tokens = strategy.reduce(self.loss_tokens.to(device, copy=True), reduce_op="sum")
        nll_sum = strategy.reduce(self.nll_sum.to(device, copy=True), reduce_op="sum")
        counts = [self.forward_positions, self.backward_positions, self.response_tokens, self.passes]
        counts = torch.tensor(counts, device=device)
        return StepTotals(loss_sum, loss_tokens, nll_sum, *strategy.reduce(counts, reduce_op="sum").tolist())

    def seconds(self) -> float:
        return time.perf_counter() - (self.started or time.perf_counter())


def gradient_scale(loss_tokens: Tensor, accumulation: int, world: int) -> Tensor:
    """The factor that turns the gradients left by Lightning and DDP into those of ``Σ ce·w / Σ w`` over the step:
    under automatic optimization Lightning divides each micro-batch's loss by ``accumulation`` (under manual
    optimization it is 1), and DDP averages the gradients of the ``world`` devices. tests/test_contract.py pins both."""
    return accumulation * world / loss_tokens.clamp(min=1)


def decide(policy: PruningPolicy, stats: BatchStats, across_devices: bool) -> PruneDecision:
    """The policy's decision on ``stats``; ``across_devices``: over every device's statistics (gathered here, so that
    the policy stays a pure function of what it is given), cut back to this device's rows."""
    if not across_devices or world_size() == 1:
        return policy.select(stats)
    everyone, first = gather_stats(stats)
    return policy.select(everyone).rows(first, *stats.response_mask.shape)


def zero_for_every_parameter(model: torch.nn.Module) -> Tensor:
    """A loss of 0 whose backward gives every trainable parameter a gradient of 0: a skipped micro-batch's stand-in
    that still fires DDP's gradient hooks, so this device joins the all-reduce the others wait in."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


class SFTModule(LightningModule):
    """Causal-LM fine-tuning under a `PruningPolicy`.

    Args:
        model: a Hugging Face causal LM (optionally peft-wrapped).
        policy: decides, per training batch, which rows and positions count.
        optimizer: partial of a torch optimizer, called with the trainable parameters.
        scheduler: partial called with ``(optimizer, total_steps=...)`` returning a per-step LR scheduler, or None.
        max_bad_steps: micro-batches in a row with a non-finite loss before the run stops (each one is skipped).
        scope: over which rows one decision is made (`StepScope`).
        layout: how every pass lays out its rows (`Layout`: right-padded, or packed).
        gradient_clip_val: the gradient-norm clip of a window the module trains itself (Lightning clips under
            automatic optimization); None or 0: no clipping.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        policy: PruningPolicy,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        max_bad_steps: int = 10,
        scope: StepScope | None = None,
        gradient_clip_val: float | None = None,
        layout: Layout | None = None,
    ) -> None:
        super().__init__()
        if max_bad_steps < 1:
            raise QTuningError(f"max_bad_steps={max_bad_steps} must be at least 1")
        self.scope = scope or StepScope()
        self.layout = layout or Layout()
        self.layout_checked = False
        self.automatic_optimization = not self.scope.manual
        self.gradient_clip_val = gradient_clip_val
        self.max_bad_steps = max_bad_steps
        self.bad_steps_in_a_row = 0
        self.bad_steps = 0
        self.model = model
        self.policy = policy
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_loss = MeanMetric()  # weighted by response tokens: the token-level mean over the whole split
        self.sums = StepSums()
        self.token_totals = dict.fromkeys(TOKEN_TOTALS, 0)  # checkpointed: a resumed run ends with the same totals
        self.total_steps: int | None = None  # optimizer steps of the whole run as planned (the LR schedule's length)

    # ---- training: one decision's rows per batch --------------------------------------------------------------

    def configure_model(self) -> None:
        """Under ``trainer=fsdp2``: shard the model on the data-parallel mesh (`shard_model`), once."""
        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not is_sharded(self.model):
            shard_model(self.model, self.device_mesh["data_parallel"], self.trainer.precision)

    @property
    def sharded(self) -> bool:
        """Whether every forward and backward pass is a collective (FSDP2): every device then runs as many training
        passes as the others, and they agree on each pass's finiteness."""
        return is_sharded(self.model) and world_size() > 1

    def on_fit_start(self) -> None:
        self.check_layout()

    def on_validation_start(self) -> None:
        self.check_layout()

    def check_layout(self) -> None:
        """Once, before the first packed pass: a model whose attention lets packed samples see each other stops the
        run (``data.padding_free=true``) or runs right-padded passes instead (``auto``)."""
        if not self.layout.packed or self.layout_checked:
            return
        self.layout_checked = True
        problem = packing_problem(self.model)
        if problem is None:
            return
        if self.layout.required:
            raise QTuningError(f"data.padding_free=true: {problem}; use data.padding_free=false")
        log.warning("data.padding_free=auto: %s; the passes run right-padded rows instead", problem)
        self.layout = Layout()

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any] | None:
        """Score, decide, train the kept rows (and, for a window the module trains itself, step the optimizer).

        Returns what the step made, for callbacks (`on_train_batch_end`'s ``outputs``): ``loss``, ``stats`` ``[W,
        T-1]``, ``decision`` and ``row_losses`` (``[K]`` sample_idx, ``[K]`` mean loss of each kept row). When every
        training pass was skipped (a non-finite loss here or on another device): only a ``loss`` of 0 under automatic
        optimization, None under manual.
        """
        self.sums.start()
        scored = self.score(batch)
        decision = self.decide(scored.stats)
        passes = self.train_kept(batch, scored, decision, batch_idx)
        self.sums.add_batch(batch, scored)
        forward = scored.positions + sum(p.forward_positions for p in passes)
        self.log_decision(scored.stats, decision, forward, sum(p.backward_positions for p in passes))
        self.stop_after_too_many_bad_steps()
        if self.scope.manual:
            self.step_optimizer()
        if not passes:
            # Lightning refuses a skipped step under DDP: a loss of 0 keeps every device in the backward's all-reduce
            # (and `on_before_optimizer_step` then leaves the weights as they are)
            return {"loss": self.stand_in_loss(batch, decision)} if self.automatic_optimization else None
        losses = [p.row_losses(batch) for p in passes]
        return {
            # under automatic optimization, Lightning's backward pass (one training pass: a window of one micro-batch)
            "loss": passes[0].loss_sum if self.automatic_optimization else sum(p.loss_sum.detach() for p in passes),
            "stats": scored.stats,
            "decision": decision,
            "row_losses": (torch.cat([idx for idx, _ in losses]), torch.cat([loss for _, loss in losses])),
        }

    def score(self, batch: Batch) -> Scored:
        """Step 1: the statistics the policy decides from, with what it adds from the model (`PruningPolicy.enrich`),
        from a scoring pass per micro-batch (``separate``), from one grad forward over the batch (``shared``) or from
        the masks alone."""
        labels, mask, sample_idx = batch["labels"], batch["attention_mask"], batch["sample_idx"]
        if not self.policy.needs_scores:
            stats = BatchStats.from_masks(labels, mask, sample_idx)
            return Scored(self.policy.enrich(self.model, batch, stats), None, None, 0)
        if self.policy.scoring == "shared":
            run = self.layout.rows(batch)
            hidden = final_hidden_states(self.model, run.inputs)  # [R, L, H], with autograd: the training forward too
            head = output_head(self.model)
            inputs = run.inputs
            pass_stats = BatchStats.from_hidden_states(
                hidden, head, head.vocab_size, inputs["labels"], inputs["attention_mask"]
            )
            stats = run.sample_stats(pass_stats, sample_idx)
            return Scored(self.policy.enrich(self.model, batch, stats), hidden, run, run.positions_run)
        parts, positions = [], 0
        for rows in torch.arange(labels.shape[0], device=labels.device).split(self.scope.micro_batch or len(labels)):
            run = self.layout.rows(batch, rows)
            stats = run.sample_stats(scoring_forward(self.model, run.inputs), sample_idx[rows])
            # a policy's own extra pass (FastV's attention, Rho-1's reference model) reads the right-padded rows
            padded = select_rows(batch, rows) if self.layout.packed else run.inputs
            parts.append(self.policy.enrich(self.model, padded, stats))
            positions += run.positions_run
        return Scored(parts[0] if len(parts) == 1 else concat_stats(parts), None, None, positions)

    def decide(self, stats: BatchStats) -> PruneDecision:
        """Step 2 (`decide`)."""
        return decide(self.policy, stats, self.scope.across_devices)

    def train_kept(self, batch: Batch, scored: Scored, decision: PruneDecision, batch_idx: int) -> list[Trained]:
        """Step 3: the training passes over the kept rows, the finite ones. Under manual optimization each is also
        backpropagated here, the gradients synchronised across devices at the last; a non-finite last pass still
        joins that synchronisation with a zero gradient."""
        if scored.hidden is not None:  # shared scoring: the scoring forward was the training forward, over every row
            groups = [torch.arange(scored.stats.batch_size, device=scored.hidden.device)]
        else:
            lengths = scored.stats.nonpad_mask.sum(1)  # [W]
            groups = length_groups(decision.sample_keep, lengths, self.scope.micro_batch or len(lengths))
        if self.sharded:  # a device with fewer passes than another runs passes of no rows (weight 0) to match it
            groups += [groups[0][:0]] * (most_on_any_device(len(groups), self.device) - len(groups))
        passes = []
        for i, rows in enumerate(groups):
            last = i == len(groups) - 1
            with self.gradient_sync(last):
                trained = self.train_rows(batch, rows, decision, scored)
                # a pass whose backward synchronises the devices (the last; under FSDP2 each one) is trained or
                # skipped by every device together
                if last or self.sharded:
                    finite = finite_on_every_device(trained.loss_sum)
                else:
                    finite = bool(torch.isfinite(trained.loss_sum))
                if not finite:
                    self.skip_nonfinite(batch_idx)
                    if self.scope.manual and last:  # the window's earlier passes still synchronise their gradients
                        self.manual_backward(self.stand_in_loss(batch, decision))
                    continue
                if self.scope.manual:
                    self.manual_backward(trained.loss_sum)
            self.bad_steps_in_a_row = 0
            self.sums.add_pass(trained, batch)
            passes.append(trained)
        return passes

    def train_rows(self, batch: Batch, rows: Tensor, decision: PruneDecision, scored: Scored | None = None) -> Trained:
        """The loss over ``rows`` ``[K]`` of ``batch``: from a grad forward over them, or from the shared scoring
        forward over every row (``scored.hidden``).

        No row (a global or window decision may leave a device nothing, or it matches another device's number of
        passes): one row goes through with weight 0, so the pass contributes 0 and this device still joins the
        collectives of the others' forward and backward.
        """
        stand_in = rows.numel() == 0
        if scored is not None and scored.hidden is not None:
            run, hidden, forward = scored.shared, scored.hidden, 0  # [R, L, H]
        else:
            if stand_in:
                rows = torch.zeros(1, dtype=torch.long, device=rows.device)
            run = self.layout.rows(batch, rows)
            hidden = final_hidden_states(self.model, run.inputs)  # [R, L, H]
            forward = run.positions_run
        weight = decision.token_keep[rows, : run.width - 1].float()  # [K, T'-1]
        if stand_in:
            weight = torch.zeros_like(weight)
        loss_weight = run.positions(weight if stand_in else self.loss_weight(weight, decision, rows))  # [R, L-1]
        labels, mask = run.inputs["labels"], run.inputs["attention_mask"]
        loss_sum, ce = token_loss(hidden, output_head(self.model), labels, mask, loss_weight)
        kept = slice(0 if stand_in else None)  # a stand-in pass trains no row
        return Trained(loss_sum, run.samples(ce)[kept], weight[kept], rows[kept], forward, run.positions_run)

    def stand_in_loss(self, batch: Batch, decision: PruneDecision) -> Tensor:
        """A loss of 0 whose backward reaches every trainable parameter: a skipped pass's stand-in that still joins
        the gradient synchronisation. Under FSDP2 it comes from a pass of one row with weight 0 (a sharded
        parameter takes part in a backward only through the model's forward); otherwise from the parameters."""
        if self.sharded:
            return self.train_rows(batch, batch["sample_idx"][:0], decision).loss_sum
        return zero_for_every_parameter(self.model)

    @staticmethod
    def loss_weight(weight: Tensor, decision: PruneDecision, rows: Tensor) -> Tensor:
        """``[K, T'-1]``: the weight of each position in the loss sum; a per-sample scale (InfoBatch's 1/r) rescales
        the loss, not the token count of the denominator."""
        return weight if decision.loss_scale is None else weight * decision.loss_scale[rows, None]

    def gradient_sync(self, last: bool) -> AbstractContextManager:
        """Around a manual backward pass: DDP's ``no_sync`` unless it is the window's last (under automatic
        optimization Lightning does this itself)."""
        strategy = self.trainer.strategy if self.scope.manual else None
        if last or not isinstance(strategy, ParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def step_optimizer(self) -> None:
        """Step 4 for a window the module trains itself (`on_before_optimizer_step` normalises and clips)."""
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def log_decision(self, stats: BatchStats, decision: PruneDecision, forward: int, backward: int) -> None:
        """The decision's per-step scalars, and the positions (padding included) through all forward passes and
        through the backward passes of the training batch."""
        self.log_dict(
            {
                "prune/kept_samples": decision.sample_keep.float().mean(),
                "prune/kept_tokens": decision.token_keep.sum() / stats.nonpad_mask.sum().clamp(min=1),
                "prune/fwd_tokens": float(forward),
                "prune/bwd_tokens": float(backward),
                **{f"prune/{k}": float(v) for k, v in decision.metrics.items()},
            },
            on_step=True,
            on_epoch=False,
            batch_size=stats.batch_size,
        )

    def skip_nonfinite(self, batch_idx: int) -> None:
        """A non-finite loss (here or, for a pass the devices synchronise in, on another device): no backward pass,
        nothing accumulated."""
        self.bad_steps += 1
        self.bad_steps_in_a_row += 1
        self.log("train/nonfinite_skipped", float(self.bad_steps), on_step=True, on_epoch=False)
        log.warning("non-finite loss at batch %d: skipped (%d in a row)", batch_idx, self.bad_steps_in_a_row)

    def stop_after_too_many_bad_steps(self) -> None:
        """Past ``max_bad_steps`` non-finite passes in a row on any device, every device stops here together (and
        `SaveOnInterrupt` saves one checkpoint of the last finite state); one device stopping alone would leave the
        others waiting in their next collective."""
        if any_device(self.bad_steps_in_a_row >= self.max_bad_steps, self.device):
            raise NonFiniteLossError(
                f"max_bad_steps={self.max_bad_steps}: {self.max_bad_steps} micro-batches in a row had a "
                "non-finite loss (lower optimizer.lr, or use model.dtype=fp32); the last finite state is saved"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the summed gradients into those of the step's loss ``Σ ce·w / Σ w`` over all devices, clip them (for
        a window the module trains itself: Lightning clips after this hook otherwise), and log the step."""
        totals = self.sums.reduce(self.trainer.strategy, self.device)
        counts = [round(float(totals.loss_tokens)), totals.forward_positions, totals.backward_positions]
        for key, value in zip(TOKEN_TOTALS, [*counts, totals.response_tokens], strict=True):
            self.token_totals[key] += value
        if totals.passes == 0:  # every pass of the step was skipped, on every device: the step changes nothing
            optimizer.zero_grad(set_to_none=True)
        scale = gradient_scale(totals.loss_tokens, self.trainer.accumulate_grad_batches, self.trainer.world_size)
        scale = float(scale)  # a number: FSDP2's gradients are sharded tensors, which take no plain tensor
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
        if self.scope.manual and self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        self.log_dict(
            {
                "train/loss": totals.loss_sum / totals.loss_tokens.clamp(min=1),
                # the NLL per response token learnt from: comparable across pruners and loss_norm, unlike train/loss
                "train/nll": totals.nll_sum / max(1, totals.response_tokens),
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/loss_tokens": totals.loss_tokens,
                "train/tokens_per_s": self.sums.input_tokens / max(self.sums.seconds(), 1e-9),
            },
            on_step=True,
            on_epoch=False,
            prog_bar=True,
        )
        self.sums.reset()

    # ---- validation: never pruned -----------------------------------------------------------------------------

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        run = self.layout.rows(batch)
        hidden = final_hidden_states(self.model, run.inputs)  # [R, L, H]
        loss_sum, _ = token_loss(hidden, output_head(self.model), run.inputs["labels"], run.inputs["attention_mask"])
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
            return trainer.max_steps if trainer.max_steps >= 0 else None
        total = trainer.global_step + sum(math.ceil(b / trainer.accumulate_grad_batches) for b in batches)
        return min(total, trainer.max_steps) if trainer.max_steps >= 0 else total

    def on_train_epoch_start(self) -> None:
        """Under a dataset-level sample pruner the epochs differ in length (InfoBatch): the run's end, and the
        schedule's, moves with the plan of the epoch starting now."""
        self.total_steps = self.planned_total_steps()
        schedulers = self.lr_schedulers()
        scheduler = schedulers[0] if isinstance(schedulers, list) else schedulers
        if self.total_steps is not None and hasattr(scheduler, "total_steps"):
            scheduler.total_steps = self.total_steps
