"""Dataset-level sample pruners on hand-built sample information: exact keep sets, seeds, InfoBatch's schedule."""

from __future__ import annotations

import math

import pytest
import torch

from qtuning.data.plan import SampleInfo
from qtuning.ops.stats import BatchStats
from qtuning.pruning import AllSamples, ComboPolicy, InfoBatch, NoPruning, RandomSubset, StaticScorePruner
from qtuning.pruning.base import keep_count
from qtuning.pruning.sample_level import char_entropy, infobatch_plan, keep_extreme, truncated_infobatch_plan


def info(n: int = 8, response: list[int] | None = None, instructions: list[str] | None = None) -> SampleInfo:
    return SampleInfo(
        torch.tensor(response if response is not None else list(range(1, n + 1))),
        instructions if instructions is not None else [f"question {i}" for i in range(n)],
    )


def test_keep_extreme_with_ties_by_index():
    scores = torch.tensor([3.0, 1, 2, 2, 5])
    assert keep_extreme(scores, 0.4, largest=True).tolist() == [0, 4]
    assert keep_extreme(scores, 0.4, largest=False).tolist() == [1, 2]  # 2 at index 2 before 2 at index 3
    assert keep_extreme(scores, 0.01, largest=True).tolist() == [4]  # at least one sample
    assert keep_count(5, 1.0) == 5 and keep_count(5, 0.01) == 1


def test_char_entropy_by_hand():
    assert char_entropy("aabb") == pytest.approx(1.0)
    assert char_entropy("abcd") == pytest.approx(2.0)
    assert char_entropy("aaab") == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert char_entropy("aaaa") == 0.0 and char_entropy("") == 0.0


@pytest.mark.parametrize(
    ("measure", "keep", "data", "expected"),
    [
        ("response_tokens", "largest", info(4, response=[5, 9, 1, 9]), [1, 3]),
        # the authors' "Longest": instructions of 2, 1, 4, 3 characters, the shortest kept
        ("instruction_chars", "smallest", info(4, instructions=["xx", "x", "xxxx", "xxx"]), [0, 1]),
        ("instruction_entropy", "smallest", info(4, instructions=["aaaa", "abcd", "aabb", "abab"]), [0, 2]),  # 0,2,1,1
    ],
    ids=["longest", "shortest", "entropy"],
)
def test_static_pruners_keep_sets(measure, keep, data, expected):
    pruner = StaticScorePruner(0.5, measure, keep)
    first, later = pruner.plan(0, data, 3), pruner.plan(2, data, 3)
    assert first.indices.tolist() == expected == later.indices.tolist()  # the same subset every epoch
    assert torch.equal(first.weights, torch.ones(4))


@pytest.mark.parametrize(
    "pruner",
    [
        RandomSubset(1.0, seed=3),
        StaticScorePruner(1.0, "response_tokens", "largest"),
        StaticScorePruner(1.0, "instruction_entropy", "smallest"),
        InfoBatch(1.0),
        InfoBatch(1.0, delta=1.0, truncate=True),
        AllSamples(),
    ],
    ids=["random", "longest", "entropy", "infobatch", "infobatch-truncated", "none"],
)
def test_ratio_one_is_the_identity(pruner):
    data = info(8)
    for epoch in range(2):
        plan = pruner.plan(epoch, data, 3)
        assert plan.indices.tolist() == list(range(8)) and torch.equal(plan.weights, torch.ones(8))
        pruner.record(torch.arange(8), torch.arange(8.0))  # InfoBatch: scores now differ, r = 1 keeps all anyway


def test_random_subset_is_seeded_and_redrawn_every_epoch():
    data = info(16)
    a, b = RandomSubset(0.25, seed=5), RandomSubset(0.25, seed=5)
    plans = [a.plan(e, data, 4).indices for e in range(4)]
    assert all(torch.equal(p, b.plan(e, data, 4).indices) for e, p in enumerate(plans))
    assert all(p.numel() == 4 and p.unique().numel() == 4 for p in plans)
    assert len({tuple(p.tolist()) for p in plans}) > 1
    assert not torch.equal(RandomSubset(0.25, seed=6).plan(0, data, 4).indices, plans[0])


def test_infobatch_plan_keeps_the_hard_half_and_a_weighted_r_of_the_rest():
    scores = torch.tensor([4.0, 4, 4, 4, 0, 0, 0, 0])  # mean 2: samples 4-7 are well learned
    plan = infobatch_plan(scores, 0.5, torch.Generator().manual_seed(0))
    kept = plan.indices.tolist()
    assert kept[:4] == [0, 1, 2, 3] and len(kept) == 6  # all of the hard ones, round(0.5 · 4) = 2 of the rest
    assert set(kept[4:]) <= {4, 5, 6, 7}
    expected_weights = torch.ones(8)
    expected_weights[kept[4:]] = 2.0  # 1 / r
    assert torch.equal(plan.weights, expected_weights)
    again = infobatch_plan(scores, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again.indices, plan.indices)


def test_infobatch_prunes_nothing_in_epoch_0_then_prunes_then_anneals():
    data = info(8)
    pruner = InfoBatch(0.5, delta=0.875, seed=1)
    max_epochs = 8  # annealing from epoch ceil(0.875 · 8) = 7
    first = pruner.plan(0, data, max_epochs)
    assert first.indices.tolist() == list(range(8)) and torch.equal(first.weights, torch.ones(8))
    pruner.record(torch.arange(8), torch.tensor([4.0, 4, 4, 4, 0, 0, 0, 0]))
    pruned = pruner.plan(6, data, max_epochs)
    assert pruned.indices.numel() == 6 and set(range(4)) <= set(pruned.indices.tolist())
    assert sorted(pruned.weights.tolist()) == [1.0] * 6 + [2.0] * 2
    annealed = pruner.plan(7, data, max_epochs)
    assert annealed.indices.tolist() == list(range(8)) and torch.equal(annealed.weights, torch.ones(8))
    assert pruner.planned_sizes(7, data, max_epochs) == [8]


def test_infobatch_planned_sizes_follow_the_current_epoch_until_annealing():
    data = info(8)
    pruner = InfoBatch(0.5, delta=0.5, seed=0)
    pruner.plan(0, data, 4)
    pruner.record(torch.arange(8), torch.tensor([4.0, 4, 4, 4, 0, 0, 0, 0]))
    assert pruner.planned_sizes(1, data, 4) == [6, 8, 8]  # epoch 1 pruned to 6; epochs 2, 3 >= 0.5 · 4: full


def test_infobatch_state_resumes_inside_an_epoch():
    data = info(8)
    pruner = InfoBatch(0.5, seed=2)
    pruner.plan(0, data, 3)
    pruner.record(torch.arange(8), torch.tensor([4.0, 4, 4, 4, 0, 0, 0, 0]))
    plan = pruner.plan(1, data, 3)
    pruner.record(torch.tensor([0, 1]), torch.tensor([0.1, 0.2]))  # half-way through epoch 1
    resumed = InfoBatch(0.5, seed=2)
    resumed.load_state_dict(pruner.state_dict())
    assert torch.equal(resumed.scores, pruner.scores)
    # a resumed trainer asks for the LR schedule's length from epoch 0 before it builds epoch 1's loader
    # (an estimate from the new scores, mean 1.5375: samples 2 and 3 above it, and 3 of the other 6)
    assert resumed.planned_sizes(0, data, 3) == [5, 5, 5]
    same = resumed.plan(1, data, 3)  # the plan of the epoch under way, not one from the new scores
    assert torch.equal(same.indices, plan.indices) and torch.equal(same.weights, plan.weights)
    assert torch.equal(resumed.plan(2, data, 3).indices, pruner.plan(2, data, 3).indices)


def test_truncated_infobatch_keeps_the_first_hard_samples_when_they_fill_r_n():
    # mean 1.5: samples 0-2 are >= the mean; int(0.25 · 5) = 1 of the other 5 is drawn, then the list
    # [0, 1, 2, drawn] is cut to int(0.25 · 8) = 2: the two lowest-index hard samples, no weight 1/r left
    scores = torch.tensor([4.0, 4, 4, 0, 0, 0, 0, 0])
    for seed in range(3):  # whatever the draw
        plan = truncated_infobatch_plan(scores, 0.25, torch.Generator().manual_seed(seed))
        assert plan.indices.tolist() == [0, 1] and torch.equal(plan.weights, torch.ones(8))
    original = infobatch_plan(scores, 0.25, torch.Generator().manual_seed(0))  # no cut: 3 hard + round(1.25) = 1
    assert original.indices.numel() == 4 and sorted(original.weights.tolist())[-1] == 4.0


def test_truncated_infobatch_fills_up_with_the_first_drawn_below_mean_samples_weighted_1_over_r():
    # mean 1.25: samples 1 and 6 are >= the mean; int(0.5 · 6) = 3 of the well-learned 0, 2, 3, 4, 5, 7 drawn;
    # the list [1, 6, d0, d1, d2] is cut to int(0.5 · 8) = 4: d2 is drawn but cut, d0 and d1 get weight 2
    scores = torch.tensor([0.0, 5, 0, 0, 0, 0, 5, 0])
    well = torch.tensor([0, 2, 3, 4, 5, 7])
    d0, d1, d2 = well[torch.randperm(6, generator=torch.Generator().manual_seed(7))][:3].tolist()
    plan = truncated_infobatch_plan(scores, 0.5, torch.Generator().manual_seed(7))
    assert plan.indices.tolist() == sorted([1, 6, d0, d1]) and d2 not in plan.indices.tolist()
    expected = torch.ones(8)
    expected[[d0, d1]] = 2.0
    assert torch.equal(plan.weights, expected)
    # equal scores (epoch 0): nothing is below the mean, the list holds every sample and is not cut
    assert truncated_infobatch_plan(torch.ones(8), 0.5, torch.Generator()).indices.tolist() == list(range(8))


def test_truncated_infobatch_without_annealing_prunes_every_epoch_after_the_first():
    data = info(8)
    pruner = InfoBatch(0.25, delta=1.0, seed=0, truncate=True)  # pruner/sample=infobatch_truncated
    assert pruner.plan(0, data, 3).indices.tolist() == list(range(8))
    assert pruner.planned_sizes(0, data, 3) == [8, 2, 2]  # int(0.25 · 8) = 2, known before any loss
    pruner.record(torch.arange(8), torch.tensor([4.0, 4, 4, 0, 0, 0, 0, 0]))
    for epoch in (1, 2):  # the last epoch too: delta = 1 never anneals
        assert pruner.plan(epoch, data, 3).indices.tolist() == [0, 1]
    assert pruner.planned_sizes(2, data, 3) == [2]


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"r_sample=0.0 must be in \(0, 1\]"):
        RandomSubset(0.0)
    with pytest.raises(ValueError, match=r"measure='words' must be one of"):
        StaticScorePruner(0.5, "words", "largest")
    with pytest.raises(ValueError, match=r"delta=1.5 must be in \[0, 1\]"):
        InfoBatch(0.5, delta=1.5)
    with pytest.raises(ValueError, match=r"truncate='yes' must be true or false"):
        InfoBatch(0.5, truncate="yes")


def test_combo_scales_the_loss_by_the_plan_weights():
    data = info(8)
    pruner = InfoBatch(0.5, seed=0)
    policy = ComboPolicy(pruner, NoPruning(loss_norm="response"))
    policy.epoch_plan(0, data, 3)
    response = torch.ones(4, 3, dtype=torch.bool)
    stats = BatchStats(response_mask=response, nonpad_mask=response, sample_idx=torch.tensor([0, 5, 6, 7]))
    batch = {"sample_idx": stats.sample_idx}
    first = policy.select(policy.enrich(torch.nn.Identity(), batch, stats))
    assert first.loss_scale is None and first.metrics["epoch_samples"] == 1.0  # epoch 0: all weights 1
    pruner.record(torch.arange(8), torch.tensor([4.0, 4, 4, 4, 0, 0, 0, 0]))
    plan = policy.epoch_plan(1, data, 3)
    decision = policy.select(policy.enrich(torch.nn.Identity(), batch, stats))
    assert torch.equal(decision.loss_scale, plan.weights[[0, 5, 6, 7]])
    assert decision.metrics["epoch_samples"] == 0.75  # 6 of 8
    assert torch.equal(decision.token_keep, response)  # the token pruner (none) decides the positions
