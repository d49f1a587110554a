"""Pruning policies and the types they exchange with the training loop: each decides from `BatchStats` (made by
`qtuning.ops`) and returns a `PruneDecision`."""

from qtuning.ops.stats import BatchStats
from qtuning.pruning.base import NoPruning, PruneDecision, PruningPolicy, keep_count, loss_positions
from qtuning.pruning.combo import ComboPolicy
from qtuning.pruning.qtuning import QTuningPolicy
from qtuning.pruning.random_sample import RandomSamplePolicy
from qtuning.pruning.sample_level import AllSamples, InfoBatch, RandomSubset, SamplePruner, StaticScorePruner
from qtuning.pruning.token_level import (
    FastVTokenPolicy,
    PPLTokenPolicy,
    RandomTokenPolicy,
    Rho1TokenPolicy,
    SparseVLMTokenPolicy,
)

__all__ = [
    "AllSamples",
    "BatchStats",
    "ComboPolicy",
    "FastVTokenPolicy",
    "InfoBatch",
    "NoPruning",
    "PPLTokenPolicy",
    "PruneDecision",
    "PruningPolicy",
    "QTuningPolicy",
    "RandomSamplePolicy",
    "RandomSubset",
    "RandomTokenPolicy",
    "Rho1TokenPolicy",
    "SamplePruner",
    "SparseVLMTokenPolicy",
    "StaticScorePruner",
    "keep_count",
    "loss_positions",
]
