"""The plumbing policies: `none` keeps everything, `random` keeps exactly K rows, seeded and resumable."""

from __future__ import annotations

import pytest
import torch

from qtuning.pruning import BatchStats, NoPruning, RandomSamplePolicy, keep_count


def masks_only(batch: int = 8, length: int = 6) -> BatchStats:
    response = torch.zeros(batch, length, dtype=torch.bool)
    response[:, 2:] = True  # a 2-token prompt
    nonpad = torch.ones(batch, length, dtype=torch.bool)
    nonpad[0, 4:] = False  # row 0 is padded
    response &= nonpad
    return BatchStats(response_mask=response, nonpad_mask=nonpad, sample_idx=torch.arange(batch))


def test_none_keeps_every_row_and_response_token():
    stats = masks_only()
    decision = NoPruning().select(stats)
    assert decision.sample_keep.all()
    assert torch.equal(decision.token_keep, stats.response_mask)


def test_loss_norm_nonpad_counts_prompt_positions():
    stats = masks_only()
    assert torch.equal(NoPruning(loss_norm="nonpad").select(stats).token_keep, stats.nonpad_mask)
    with pytest.raises(ValueError, match="loss_norm='tokens' must be one of response, nonpad"):
        NoPruning(loss_norm="tokens")


@pytest.mark.parametrize(("ratio", "k"), [(0.125, 1), (0.25, 2), (0.5, 4), (1.0, 8), (0.01, 1)])
def test_keep_count(ratio, k):
    assert keep_count(8, ratio) == k


@pytest.mark.parametrize(("ratio", "k"), [(0.125, 1), (0.25, 2), (0.5, 4), (1.0, 8)])
def test_random_keeps_exactly_k_rows(ratio, k):
    stats = masks_only()
    decision = RandomSamplePolicy(ratio, seed=3).select(stats)
    assert int(decision.sample_keep.sum()) == k
    assert torch.equal(decision.token_keep, stats.response_mask & decision.sample_keep[:, None])


def test_random_is_seeded_and_its_state_resumes():
    stats = masks_only()
    a, b = RandomSamplePolicy(0.25, seed=7), RandomSamplePolicy(0.25, seed=7)
    draws_a = [a.select(stats).sample_keep for _ in range(5)]
    draws_b = [b.select(stats).sample_keep for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(draws_a, draws_b, strict=True))
    assert len({tuple(d.tolist()) for d in draws_a}) > 1  # it really redraws every step
    saved = a.state_dict()
    following = a.select(stats).sample_keep
    resumed = RandomSamplePolicy(0.25, seed=0)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.select(stats).sample_keep, following)


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.1])
def test_random_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=rf"r_sample={ratio} must be in \(0, 1\]"):
        RandomSamplePolicy(ratio)
