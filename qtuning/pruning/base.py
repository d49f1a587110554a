"""The policy interface: a policy looks at `BatchStats` and returns a `PruneDecision`; the LightningModule applies it.

Every caller (the training step, `qtuning.analyze`, the benchmarks) runs a policy the same way:
``stats = policy.enrich(model, batch, stats)`` (what the policy needs from the model beyond the statistics, as an
enriched copy; most policies need nothing), then ``decision = policy.select(stats)``, a pure function of the statistics.
A policy is a Lightning `Callback`, so the Trainer checkpoints its state (`state_dict`) and calls its epoch hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from lightning.pytorch import Callback
from torch import Tensor

from qtuning.ops.stats import BatchStats

LOSS_NORMS = ("response", "nonpad")
SCORINGS = ("separate", "shared")
# The loss denominator's defaults (docs/method.md §5): policies that keep whole samples divide by the response tokens,
# as standard SFT (and the authors' full-data runs) do; Q-Tuning and the token baselines by every non-pad position of
# a kept row, prompt included, as the authors' code did.
SFT_LOSS_NORM = "response"
AUTHORS_LOSS_NORM = "nonpad"
DEFAULT_SCORING = "separate"  # a no-grad scoring pass, then the kept rows only: the authors' gradient, cheaper


@dataclass
class PruneDecision:
    """Which rows go through the backward pass and which positions count in the loss."""

    sample_keep: Tensor  # [B] bool
    token_keep: Tensor  # [B, T-1] bool: positions that count in the loss denominator; False on dropped rows
    quadrant: Tensor | None = None  # [B] int in 1..4 (EU-plane quadrant by batch medians) or None
    ppl: Tensor | None = None  # [B] fp32: the perplexity (error) each sample was placed on the EU plane by, or None
    entropy: Tensor | None = None  # [B] fp32: its mean entropy (uncertainty), in the policy's entropy scope
    # [B] float or None: a per-sample loss weight (InfoBatch's 1/r); it scales the cross-entropy, not the token count
    loss_scale: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # logged as prune/<key>

    def rows(self, first: int, batch: int, length: int) -> PruneDecision:
        """The decision for ``batch`` rows from ``first`` on, at their ``length - 1`` target positions: one device's
        part of a decision made over every device's rows (the metrics stay those of the whole)."""
        rows = slice(first, first + batch)

        def part(per_sample: Tensor | None) -> Tensor | None:
            return per_sample[rows] if per_sample is not None else None

        return PruneDecision(
            sample_keep=self.sample_keep[rows],
            token_keep=self.token_keep[rows, :length],
            quadrant=part(self.quadrant),
            ppl=part(self.ppl),
            entropy=part(self.entropy),
            loss_scale=part(self.loss_scale),
            metrics=self.metrics,
        )


def keep_count(n: int, ratio: float) -> int:
    """K = max(1, round(n · ratio)), with Python's round (half to even), as the Q-Tuning authors' code."""
    return max(1, round(n * ratio))


def check_ratio(name: str, value: float) -> float:
    """A keep ratio must lie in (0, 1]."""
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name}={value} must be in (0, 1]")
    return float(value)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def loss_positions(stats: BatchStats, loss_norm: str) -> Tensor:
    """``[B, T-1]`` bool: the positions a kept row contributes to the loss denominator.

    ``response``: response tokens only (standard SFT). ``nonpad``: every non-pad position, prompt included, as the
    Q-Tuning authors' code normalised (the cross-entropy itself is 0 outside the response either way).
    """
    return stats.response_mask if loss_norm == "response" else stats.nonpad_mask


class PruningPolicy(Callback, ABC):
    """Base class. Subclasses set `needs_scores` and implement `select`; those that need more of the model than the
    statistics override `enrich`; stateful ones override `state_dict`.

    Args:
        loss_norm: the positions of a kept row that count in the loss denominator: ``response`` (`SFT_LOSS_NORM`)
            or ``nonpad`` (`AUTHORS_LOSS_NORM`); see `loss_positions`.
        scoring: how a policy that needs scores gets them: ``separate`` (a no-grad scoring pass, then forward and
            backward over the kept rows only) or ``shared`` (the authors': one full forward, pruning only masks).
    """

    #: Whether `select` needs `token_nll`/`token_entropy`, i.e. a scoring forward before the training forward.
    needs_scores: bool = False
    #: Over which rows the module makes one decision (`qtuning.module.StepScope`); the policy itself only ever sees
    #: the statistics it is given.
    threshold_scope: str = "local"

    def __init__(self, loss_norm: str = SFT_LOSS_NORM, scoring: str = DEFAULT_SCORING) -> None:
        self.loss_norm = check_choice("loss_norm", loss_norm, LOSS_NORMS)
        self.scoring = check_choice("scoring", scoring, SCORINGS)

    def enrich(self, model: torch.nn.Module, batch: dict[str, Tensor], stats: BatchStats) -> BatchStats:
        """``stats`` with what `select` needs from the model beyond them (an attention map, a reference model's
        NLL), as a copy; by default nothing: ``stats`` itself."""
        return stats

    @abstractmethod
    def select(self, stats: BatchStats) -> PruneDecision:
        """Decide for one (local) batch, from its statistics alone."""

    def keep_rows(
        self, stats: BatchStats, sample_keep: Tensor, metrics: dict[str, float] | None = None
    ) -> PruneDecision:
        """A decision that keeps whole rows: every loss position of a kept row counts, none of a dropped row."""
        token_keep = loss_positions(stats, self.loss_norm) & sample_keep[:, None]  # [B, T-1]
        return PruneDecision(sample_keep=sample_keep, token_keep=token_keep, metrics=metrics or {})


class NoPruning(PruningPolicy):
    """Full-data SFT: every sample and every response token."""

    def select(self, stats: BatchStats) -> PruneDecision:
        keep = torch.ones(stats.batch_size, dtype=torch.bool, device=stats.response_mask.device)
        return self.keep_rows(stats, keep)
