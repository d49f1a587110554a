"""Pruning policies and the types they exchange with the training loop."""

from qtuning.pruning.base import NoPruning, PruneDecision, PruningPolicy, loss_positions
from qtuning.pruning.qtuning import QTuningPolicy
from qtuning.pruning.random_sample import RandomSamplePolicy, keep_count
from qtuning.pruning.stats import BatchStats, shift_targets, token_cross_entropy

__all__ = [
    "BatchStats",
    "NoPruning",
    "PruneDecision",
    "PruningPolicy",
    "QTuningPolicy",
    "RandomSamplePolicy",
    "keep_count",
    "loss_positions",
    "shift_targets",
    "token_cross_entropy",
]
