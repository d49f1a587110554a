"""The policy interface: a policy looks at `BatchStats` and returns a `PruneDecision`; the LightningModule applies it.

A policy is a Lightning `Callback`, so the Trainer checkpoints its state (`state_dict`) and calls its epoch hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from lightning.pytorch import Callback
from torch import Tensor

from qtuning.pruning.stats import BatchStats

if TYPE_CHECKING:
    from qtuning.pruning.sample_level import SamplePruner

LOSS_NORMS = ("response", "nonpad")
SCORINGS = ("separate", "shared")


@dataclass
class PruneDecision:
    """Which rows go through the backward pass and which positions count in the loss."""

    sample_keep: Tensor  # [B] bool
    token_keep: Tensor  # [B, T-1] bool: positions that count in the loss denominator; False on dropped rows
    quadrant: Tensor | None = None  # [B] int in 1..4 (EU-plane quadrant by batch medians) or None
    # [B] float or None: a per-sample loss weight (InfoBatch's 1/r); it scales the cross-entropy, not the token count
    loss_scale: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # logged as prune/<key>


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
    """Base class. Subclasses set `needs_scores` and implement `select`; stateful ones override `state_dict`."""

    #: Whether `select` needs `token_nll`/`token_entropy`, i.e. a scoring forward before the training forward.
    needs_scores: bool = False
    #: A dataset-level sample pruner whose plan each epoch trains on (see `ComboPolicy`); None: every sample.
    sample_pruner: SamplePruner | None = None

    def __init__(self, loss_norm: str = "response", scoring: str = "separate") -> None:
        self.loss_norm = check_choice("loss_norm", loss_norm, LOSS_NORMS)
        #: How a policy that needs scores gets them: ``separate`` (a no-grad scoring pass, then forward/backward
        #: over the kept rows only) or ``shared`` (the authors': one full forward, pruning only masks the loss).
        self.scoring = check_choice("scoring", scoring, SCORINGS)

    @abstractmethod
    def select(self, stats: BatchStats) -> PruneDecision:
        """Decide for one (local) batch."""

    def select_batch(self, model: torch.nn.Module, batch: dict[str, Tensor], stats: BatchStats) -> PruneDecision:
        """What the training step calls. Policies that need more than `BatchStats` (attention maps, a reference
        model) override this and run their own no-grad pass over ``batch``; the others decide from ``stats``."""
        return self.select(stats)

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
