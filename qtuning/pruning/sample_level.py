"""Dataset-level sample pruners (the paper's sample baselines): which training samples an epoch uses.

At every epoch start the data module asks the pruner for an `EpochPlan` and builds that epoch's loader from it, so
the number of steps shrinks with the data, as in the paper. Static pruners score each sample once from the data;
`random` redraws every epoch; `infobatch` scores samples by their last training loss. Selection rules are pure
functions; the classes hold the scores and the state a checkpoint must carry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from qtuning.data.plan import EpochPlan, SampleInfo
from qtuning.pruning.base import check_choice, check_ratio, keep_count


def keep_extreme(scores: Tensor, ratio: float, largest: bool) -> Tensor:
    """``[M]`` ascending indices of the keep_count(N, ratio) largest (or smallest) scores; ties: lower index first."""
    order = torch.sort(scores, descending=largest, stable=True).indices
    return order[: keep_count(scores.numel(), ratio)].sort().values


def char_entropy(text: str) -> float:
    """Shannon entropy (bits) of the character distribution of ``text``; 0 for an empty text."""
    counts = Counter(text)
    total = len(text)
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator that depends on (seed, epoch) only: an epoch's draw is the same after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def below_mean_draw(scores: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """InfoBatch's split of ``scores`` ``[N]``: ``[a]`` the ascending indices of the samples whose score is ≥ the mean,
    ``[n]`` the others (well learned) in a random order drawn from ``generator``."""
    below = scores < scores.mean()
    well_learned = below.nonzero().squeeze(1)  # [n]
    return (~below).nonzero().squeeze(1), well_learned[torch.randperm(well_learned.numel(), generator=generator)]


def infobatch_plan(scores: Tensor, ratio: float, generator: torch.Generator) -> EpochPlan:
    """InfoBatch's pruned epoch (Qin et al., ICLR 2024): every sample whose score is ≥ the mean, plus a random
    round(r · n) of the n below the mean, those rescaled by 1/r so the expected gradient is unchanged."""
    hard, drawn = below_mean_draw(scores, generator)
    kept_well = drawn[: round(ratio * drawn.numel())]
    weights = torch.ones_like(scores, dtype=torch.float32)
    weights[kept_well] = 1.0 / ratio
    return EpochPlan(torch.cat([hard, kept_well]).sort().values, weights)


def truncated_infobatch_plan(scores: Tensor, ratio: float, generator: torch.Generator) -> EpochPlan:
    """InfoBatch as the Q-Tuning authors' code ran it (docs/method.md §7): the list of the samples ≥ the mean (in
    index order) followed by a random int(r · n) of the n below it (in draw order, weight 1/r), cut to its first
    int(r · N) entries (at least 1) unless it holds every sample (equal scores, as in epoch 0). The cut keeps the
    hard samples first: below-mean samples, and so weights 1/r, survive only when fewer than r · N are ≥ the mean."""
    hard, drawn = below_mean_draw(scores, generator)
    kept_well = drawn[: int(ratio * drawn.numel())]
    order = torch.cat([hard, kept_well])  # [a + k]: the authors' list before the cut
    if order.numel() < scores.numel():
        order = order[: max(1, int(ratio * scores.numel()))]
    weights = torch.ones_like(scores, dtype=torch.float32)
    weights[order[hard.numel() :]] = 1.0 / ratio
    return EpochPlan(order.sort().values, weights)


class SamplePruner(ABC):
    """Base class: ``plan(epoch, info, max_epochs)`` gives the epoch's samples; ``record`` sees training losses."""

    def __init__(self, r_sample: float, seed: int = 0) -> None:
        self.r_sample = check_ratio("r_sample", r_sample)
        self.seed = seed

    @abstractmethod
    def plan(self, epoch: int, info: SampleInfo, max_epochs: int) -> EpochPlan:
        """The plan of ``epoch`` (0-based) of ``max_epochs``."""

    def planned_sizes(self, epoch: int, info: SampleInfo, max_epochs: int) -> list[int]:
        """Samples each epoch from ``epoch`` to the last is expected to use (for the LR schedule's length)."""
        return [keep_count(len(info.instructions), self.r_sample)] * (max_epochs - epoch)

    def record(self, sample_idx: Tensor, losses: Tensor) -> None:
        """The mean training loss of each sample of a step (all devices); only loss-driven pruners use it."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def full_weights(info: SampleInfo) -> Tensor:
    return torch.ones(len(info.instructions))


class AllSamples(SamplePruner):
    """Every sample, every epoch (``pruner/sample=none``)."""

    def __init__(self, r_sample: float = 1.0, seed: int = 0) -> None:
        super().__init__(1.0, seed)

    def plan(self, epoch: int, info: SampleInfo, max_epochs: int) -> EpochPlan:
        return EpochPlan(torch.arange(len(info.instructions)), full_weights(info))


class RandomSubset(SamplePruner):
    """A uniformly random r_sample · N subset, redrawn every epoch from (seed, epoch)."""

    def plan(self, epoch: int, info: SampleInfo, max_epochs: int) -> EpochPlan:
        n = len(info.instructions)
        drawn = torch.randperm(n, generator=epoch_generator(self.seed, epoch))[: keep_count(n, self.r_sample)]
        return EpochPlan(drawn.sort().values, full_weights(info))


class StaticScorePruner(SamplePruner):
    """The same subset every epoch: the r_sample · N samples with the largest or smallest ``measure``.

    Measures: ``response_tokens`` (the response length in tokens), ``instruction_chars`` (the instruction length in
    characters), ``instruction_entropy`` (character-level Shannon entropy of the instruction).
    """

    MEASURES = ("response_tokens", "instruction_chars", "instruction_entropy")

    def __init__(self, r_sample: float, measure: str, keep: str, seed: int = 0) -> None:
        super().__init__(r_sample, seed)
        self.measure = check_choice("measure", measure, self.MEASURES)
        self.keep = check_choice("keep", keep, ("largest", "smallest"))

    def scores(self, info: SampleInfo) -> Tensor:
        if self.measure == "response_tokens":
            return info.response_tokens.float()
        if self.measure == "instruction_chars":
            return torch.tensor([float(len(text)) for text in info.instructions])
        return torch.tensor([char_entropy(text) for text in info.instructions])

    def plan(self, epoch: int, info: SampleInfo, max_epochs: int) -> EpochPlan:
        return EpochPlan(keep_extreme(self.scores(info), self.r_sample, self.keep == "largest"), full_weights(info))


class InfoBatch(SamplePruner):
    """InfoBatch (Qin et al., ICLR 2024) with r = r_sample: loss-driven pruning, annealed to full data.

    Scores start equal, so epoch 0 keeps everything. Before epoch ⌈δ · max_epochs⌉ each epoch keeps the samples whose
    last loss is ≥ the mean and a random r of the rest (weight 1/r); from then on, the full data with weight 1.
    ``truncate=True`` cuts each pruned epoch to r · N as the authors' code did (`truncated_infobatch_plan`); with
    δ = 1 it never anneals (the authors' run: ``pruner/sample=infobatch_truncated``).
    Scores, and the plan of the epoch under way, travel in checkpoints (`state_dict`).
    """

    def __init__(self, r_sample: float, delta: float = 0.875, seed: int = 0, truncate: bool = False) -> None:
        super().__init__(r_sample, seed)
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta={delta} must be in [0, 1]")
        if not isinstance(truncate, bool):
            raise ValueError(f"truncate={truncate!r} must be true or false")
        self.delta = delta
        self.truncate = truncate
        self.scores: Tensor | None = None  # [N] last mean loss of each sample
        self.current: tuple[int, EpochPlan] | None = None  # (epoch, plan) of the epoch under way

    def annealed(self, epoch: int, max_epochs: int) -> bool:
        return epoch >= self.delta * max_epochs

    def plan(self, epoch: int, info: SampleInfo, max_epochs: int) -> EpochPlan:
        if self.scores is None:
            self.scores = torch.ones(len(info.instructions))
        self.current = (epoch, self.preview(epoch, info, max_epochs))  # inside the epoch under way: its plan
        return self.current[1]

    def preview(self, epoch: int, info: SampleInfo, max_epochs: int) -> EpochPlan:
        """The plan of the epoch under way, or the one ``epoch`` would get from the scores as they are now, without
        making it the epoch under way: a resumed run asks about other epochs (the LR schedule's length) before its
        loader is built, and must not replace the plan its checkpoint restored."""
        if self.current is not None and self.current[0] == epoch:
            return self.current[1]
        scores = self.scores if self.scores is not None else torch.ones(len(info.instructions))
        if self.annealed(epoch, max_epochs):
            return EpochPlan(torch.arange(scores.numel()), full_weights(info))
        plan = truncated_infobatch_plan if self.truncate else infobatch_plan
        return plan(scores, self.r_sample, epoch_generator(self.seed, epoch))

    def planned_sizes(self, epoch: int, info: SampleInfo, max_epochs: int) -> list[int]:
        """This epoch's real size; for the pruned epochs after it the same, or int(r · N) when truncated (known
        ahead, unlike the original's); N once annealed."""
        current = self.preview(epoch, info, max_epochs).indices.numel()
        n = len(info.instructions)
        later = max(1, int(self.r_sample * n)) if self.truncate else current
        sizes = [current] + [later] * (max_epochs - epoch - 1)
        return [size if not self.annealed(e, max_epochs) else n for e, size in enumerate(sizes, start=epoch)]

    def record(self, sample_idx: Tensor, losses: Tensor) -> None:
        if self.scores is not None:
            self.scores[sample_idx.cpu()] = losses.detach().float().cpu()

    def state_dict(self) -> dict[str, Any]:
        current = None if self.current is None else (self.current[0], self.current[1].indices, self.current[1].weights)
        return {"scores": self.scores, "current": current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = state["scores"]
        current = state["current"]
        self.current = None if current is None else (current[0], EpochPlan(current[1], current[2]))
