"""What the data module needs from a dataset-level sample pruner, and the types they exchange: the data layer owns
this protocol, a policy implements it, and `SFTDataModule.connect` hands it over once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass
class SampleInfo:
    """What a static pruner may look at, one entry per training sample (dataset order)."""

    response_tokens: Tensor  # [N] long: response (loss) tokens of each sample
    instructions: Sequence[str]  # the user turns of each sample, joined by newlines


@dataclass
class EpochPlan:
    """The samples one epoch trains on and the loss weight of every sample."""

    indices: Tensor  # [M] long, ascending: dataset indices used this epoch (the loader shuffles them)
    weights: Tensor  # [N] fp32: per-sample loss weight (1 except InfoBatch's 1/r)


@runtime_checkable
class EpochPlanner(Protocol):
    """Plans which samples each epoch trains on (`qtuning.pruning.ComboPolicy` over a sample pruner)."""

    def epoch_plan(self, epoch: int, info: SampleInfo, max_epochs: int) -> EpochPlan:
        """The plan of ``epoch`` (0-based), made the epoch under way."""
        ...

    def planned_sizes(self, epoch: int, info: SampleInfo, max_epochs: int) -> list[int]:
        """Samples each epoch from ``epoch`` to the last is expected to use, without changing any plan."""
        ...
