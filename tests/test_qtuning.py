"""Q-Tuning's rules (docs/method.md §3–5), each pinned on hand-built inputs with hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from qtuning.pruning import BatchStats
from qtuning.pruning.qtuning import (
    QTuningPolicy,
    Triage,
    TriageSettings,
    band_masks,
    bisect_bands,
    fill_up,
    guarded_rows,
    median_quadrants,
    rank_scale,
    token_scores,
    triage,
)

# Eight samples: PPL 1..8; entropy chosen so that the highest PPL has the lowest entropy and vice versa.
PPL = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8])
ENT = torch.tensor([8.0, 3, 4, 5, 6, 7, 2, 1])


def idx(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def test_band_membership_for_a_given_q():
    # q = 0.25: quantile(PPL, .75) = 6.25, quantile(PPL, .25) = 2.75; the same for entropy (a permutation of 1..8).
    q2, q4 = band_masks(PPL, ENT, 0.25)
    assert idx(q2) == [6, 7]  # PPL > 6.25 and entropy <= 2.75
    assert idx(q4) == [0]  # PPL <= 2.75 and entropy > 6.25 (sample 5 has entropy 7 but PPL 6)


def test_bisection_moves_one_band_width_until_the_fraction_is_hit():
    # q = .245 keeps 3/8 (> .25, tighten); q = .1225 keeps {7} and {0} = 2/8, within tolerance: stop.
    q2, q4, q = bisect_bands(PPL, ENT, 0.25, TriageSettings(0.25))
    assert q == pytest.approx(0.1225)
    assert idx(q2) == [7] and idx(q4) == [0]


@pytest.mark.parametrize(("ratio", "k"), [(0.125, 1), (0.25, 2), (0.5, 4)])
def test_kept_set_reaches_k_for_b8(ratio, k):
    # Constant scores: the bands are empty at every q, so the fill-up alone supplies K samples.
    result = triage(torch.ones(8), torch.ones(8), TriageSettings(ratio))
    assert int(result.kept.sum()) == k
    assert idx(result.kept) == list(range(k))  # all ties: lower index first


def test_fill_up_order_and_q2_like_tagging():
    ppl = torch.tensor([1.0, 2, 3, 4, 5])
    ent = torch.tensor([5.0, 1, 3, 2, 4])
    # ppl_n = [0, .25, .5, .75, 1], ent_n = [1, 0, .5, .25, .75], |diff| = [1, .25, 0, .5, .25].
    kept = torch.tensor([False, False, True, False, False])
    new_kept, q2like, added = fill_up(ppl, ent, kept, torch.zeros(5, dtype=torch.bool), k=4, rule="minmax")
    assert added == 3
    assert idx(new_kept) == [0, 1, 2, 3]  # 0 (1.0), 3 (.5), then 1 before 4 on the .25 tie
    assert idx(q2like) == [1, 3]  # ppl_n >= ent_n; sample 0 is Q4-like


def test_no_truncation_above_k():
    # r = .125 gives K = 1, but the bands hold {7} and {0} at every q > 0: both stay.
    result = triage(PPL, ENT, TriageSettings(0.125))
    assert idx(result.kept) == [0, 7] and result.filled == 0


def test_fill_up_switch_off_keeps_only_the_bands():
    result = triage(torch.ones(8), torch.ones(8), TriageSettings(0.5, fill_up="none"))
    assert not result.kept.any()


# Token scores: one row, response positions 1..3 with token PPL 2, 4, 3.
NLL = torch.tensor([[0.0, math.log(2), math.log(4), math.log(3), 0.0]])
RESP = torch.tensor([[False, True, True, True, False]])


def test_token_scores_with_zero_neighbours_at_the_response_edges():
    scores = token_scores(NLL, RESP, lam=0.5)
    # s1 = .5*2 + .5*(0 + 4), s2 = .5*4 + .5*(2 + 3), s3 = .5*3 + .5*(4 + 0); outside: neighbours only.
    torch.testing.assert_close(scores, torch.tensor([[1.0, 3.0, 4.5, 3.5, 1.5]]))
    halved = token_scores(NLL, RESP, lam=0.5, neighbor_mean=True)
    torch.testing.assert_close(halved, torch.tensor([[0.5, 2.0, 3.25, 2.5, 0.75]]))


def test_lambda_zero_is_token_ppl_alone():
    torch.testing.assert_close(token_scores(NLL, RESP, lam=0.0), torch.tensor([[0.0, 2.0, 4.0, 3.0, 0.0]]))


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_neighbor_mean_equals_plain_sum_at_lambda_prime(lam):
    # (1-λ')p + (λ'/2)n with λ' = 2λ/(1+λ) is exactly ((1-λ)p + λn) / (1+λ): the same ranking.
    torch.manual_seed(0)
    nll, resp = torch.rand(3, 9) * 3, torch.rand(3, 9) > 0.3
    lam_prime = 2 * lam / (1 + lam)
    torch.testing.assert_close(
        token_scores(nll * resp, resp, lam_prime, neighbor_mean=True), token_scores(nll * resp, resp, lam) / (1 + lam)
    )


def budget_stats() -> BatchStats:
    """4 rows × 6 positions, no padding; response at positions 2..5; with λ = 0 the token score is its PPL."""
    ppl_tokens = torch.tensor(
        [
            [1.0, 1, 2, 9, 4, 7],
            [1.0, 1, 8, 3, 6, 5],
            [1.0, 1, 1, 1, 1, 1],
            [1.0, 1, 1, 1, 1, 1],
        ]
    )
    response = torch.zeros(4, 6, dtype=torch.bool)
    response[:, 2:] = True
    return BatchStats(
        response_mask=response,
        nonpad_mask=torch.ones(4, 6, dtype=torch.bool),
        token_nll=ppl_tokens.log() * response,
        token_entropy=torch.ones(4, 6),
    )


def kept_rows(q2like: list[bool]) -> Triage:
    kept = torch.tensor([True, True, False, False])
    return Triage(kept, torch.tensor(q2like + [False, False]), kept, kept, 0.1, 0, torch.zeros(4, dtype=torch.bool))


def policy(r_sample: float = 0.5, r_token: float = 0.5, **kwargs) -> QTuningPolicy:
    return QTuningPolicy(r_sample, r_token, lam=0.0, **kwargs)


def test_batch_budget_drops_the_highest_scores_across_q2_rows():
    # T_all 24, target round(24·.5·.5) = 6, removed 12 (rows 2, 3): drop 6 of the 8 candidates, highest PPL first.
    dropped = policy().dropped_tokens(budget_stats(), kept_rows([True, True]))
    assert dropped.nonzero().tolist() == [[0, 3], [0, 4], [0, 5], [1, 2], [1, 4], [1, 5]]  # PPL 9,4,7 and 8,6,5


def test_batch_budget_runs_out_of_q2_candidates_and_never_touches_q4():
    # Only row 0 is Q2: 4 candidates for a budget of 6, so all of its response goes; row 1 (Q4) keeps everything.
    dropped = policy().dropped_tokens(budget_stats(), kept_rows([True, False]))
    assert dropped[0].tolist() == [False, False, True, True, True, True]
    assert not dropped[1:].any()


def test_r_token_one_touches_no_token():
    # r_sample .25 would leave 24 - 6 - 12 = 6 tokens to drop, but r_token = 1 means no token pruning.
    assert not policy(0.25, 1.0).dropped_tokens(budget_stats(), kept_rows([True, True])).any()


@pytest.mark.parametrize(("r_token", "kept_positions"), [(0.5, [[2, 4], [3, 5]]), (0.7, [[2, 4, 5], [3, 4, 5]])])
def test_per_sample_budget_keeps_the_lowest_scores_of_each_row(r_token, kept_positions):
    stats = budget_stats()
    dropped = policy(r_token=r_token, token_budget="per_sample").dropped_tokens(stats, kept_rows([True, True]))
    for row, positions in enumerate(kept_positions):  # ceil(r_token · 4) tokens of each Q2 row
        assert idx(stats.response_mask[row] & ~dropped[row]) == positions


def per_sample_stats(ppl: torch.Tensor, ent: torch.Tensor, length: int = 6) -> BatchStats:
    """Rows whose response tokens (positions 2..) all have NLL log(ppl) and every position entropy ent."""
    batch = ppl.numel()
    response = torch.zeros(batch, length, dtype=torch.bool)
    response[:, 2:] = True
    nonpad = torch.ones(batch, length, dtype=torch.bool)
    return BatchStats(
        response_mask=response,
        nonpad_mask=nonpad,
        token_nll=ppl.log()[:, None] * response,
        token_entropy=ent[:, None].expand(batch, length).clone(),
    )


@pytest.mark.parametrize("loss_norm", ["nonpad", "response"])
def test_select_end_to_end_and_loss_norm(loss_norm):
    stats = per_sample_stats(PPL, ENT)
    decision = QTuningPolicy(0.25, 0.5, loss_norm=loss_norm).select(stats)
    assert idx(decision.sample_keep) == [0, 7]  # Q4 sample 0, Q2 sample 7 (from the bisection test)
    base = stats.nonpad_mask if loss_norm == "nonpad" else stats.response_mask
    assert torch.equal(decision.token_keep[0], base[0])  # Q4: whole
    # T_all 48, target round(48·.25·.5) = 6, removed 36: drop 6, but Q2 row 7 has only 4 response tokens.
    assert decision.token_keep[7].tolist() == base[7].tolist()[:2] + [False] * 4
    assert not decision.token_keep[1:7].any()
    assert decision.quadrant.tolist() == [4, 3, 3, 4, 1, 1, 2, 2]
    assert decision.metrics["q2_resp_token_keep"] == 0.0
    assert decision.metrics["q1"] == 2 and decision.metrics["q4_frac"] == 0.25
    # q = .1225: quantile(1..8, .8775) = 7.1425 and quantile(1..8, .1225) = 1.8575 on both axes
    assert decision.metrics["thr_ppl_high"] == pytest.approx(7.1425, abs=1e-4)
    assert decision.metrics["thr_ent_low"] == pytest.approx(1.8575, abs=1e-4)


def test_median_quadrants_by_hand():
    assert median_quadrants(PPL, ENT).tolist() == [4, 3, 3, 4, 1, 1, 2, 2]


def test_select_is_deterministic():
    torch.manual_seed(3)
    stats = per_sample_stats(torch.rand(8) * 10 + 1, torch.rand(8) * 5)
    a, b = QTuningPolicy(0.5, 0.7).select(stats), QTuningPolicy(0.5, 0.7).select(stats)
    assert torch.equal(a.sample_keep, b.sample_keep) and torch.equal(a.token_keep, b.token_keep)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r_sample": 0.0}, r"r_sample=0.0 must be in \(0, 1\]"),
        ({"r_token": 1.5}, r"r_token=1.5 must be in \(0, 1\]"),
        ({"lam": 2.0}, r"lam=2.0 must be in \[0, 1\]"),
        ({"token_budget": "row"}, r"token_budget='row' must be one of batch, per_sample"),
        ({"entropy_scope": "all"}, r"entropy_scope='all' must be one of nonpad, response"),
        ({"fill_up": "max"}, r"fill_up='max' must be one of minmax, rank, none"),
        ({"ppl_guard": 1.0}, r"ppl_guard=1.0 must be in \[0, 1\)"),
        ({"threshold_scope": "world"}, r"threshold_scope='world' must be one of local, global"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    args = {"r_sample": 0.25, "r_token": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        QTuningPolicy(**args)


# --- fill-up variants (docs/noise_probe.md) ---------------------------------------------------------------------


def test_rank_scale_with_ties():
    # sorted distinct values 1, 2, 3 at ranks 0, {1, 2} -> 1.5, 3; scaled by B - 1 = 3
    torch.testing.assert_close(rank_scale(torch.tensor([3.0, 1, 2, 2])), torch.tensor([1.0, 0, 0.5, 0.5]))
    torch.testing.assert_close(rank_scale(torch.ones(4)), torch.full((4,), 0.5))


# One extreme perplexity (sample 7) squeezes every other min-max-scaled PPL towards 0.
OUTLIER_PPL = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 100])
RISING_ENT = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8])


def test_minmax_fill_up_takes_noise_from_q1():
    # ppl_n ≈ [0, .01, .02, .03, .04, .05, .06, 1], ent_n = [0, 1/7, ..., 1]: |diff| peaks at samples 6, 5, 4, 3.
    kept, _, added = fill_up(
        OUTLIER_PPL, RISING_ENT, torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool), 4, "minmax"
    )
    assert idx(kept) == [3, 4, 5, 6] and added == 4
    assert (median_quadrants(OUTLIER_PPL, RISING_ENT)[kept] == 1).sum() == 3  # three of them above both medians


def test_rank_fill_up_never_adds_q1():
    # Ranks agree on both axes (|diff| = 0 everywhere, a tie): lower index first, but samples 4-7 are Q1.
    none = torch.zeros(8, dtype=torch.bool)
    kept, q2like, added = fill_up(OUTLIER_PPL, RISING_ENT, none, none, 4, rule="rank")
    assert idx(kept) == [0, 1, 2, 3] and added == 4
    assert idx(q2like) == [0, 1, 2, 3]  # ppl_n >= ent_n on a tie


def test_rank_fill_up_tags_by_rank_and_stops_when_only_q1_is_left():
    ppl = torch.tensor([4.0, 1, 3, 2, 8, 7, 6, 5])
    ent = torch.tensor([1.0, 4, 2, 3, 5, 6, 7, 8])  # samples 4-7 are Q1; 0 leans to PPL, 1 to entropy
    kept, q2like, added = fill_up(
        ppl, ent, torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool), 6, "rank"
    )
    assert added == 4 and idx(kept) == [0, 1, 2, 3]  # K = 6, but only four samples are outside Q1
    assert idx(q2like) == [0, 2]  # rank(ppl) >= rank(ent)


def test_fill_up_none_keeps_the_bands_only():
    kept = torch.tensor([True] + [False] * 7)
    new, _, added = fill_up(PPL, ENT, kept, kept.clone(), 4, rule="none")
    assert torch.equal(new, kept) and added == 0


# --- perplexity guard -------------------------------------------------------------------------------------------


def test_guarded_rows_are_the_highest_perplexities_and_leave_k():
    ppl = torch.tensor([3.0, 9, 1, 9, 5, 2, 7, 4])
    assert idx(guarded_rows(ppl, k=2, ppl_guard=0.25)) == [1, 3]  # floor(0.25 · 8) = 2
    assert idx(guarded_rows(ppl, k=2, ppl_guard=0.3)) == [1, 3]  # floor(2.4) = 2
    assert idx(guarded_rows(ppl, k=7, ppl_guard=0.25)) == [1]  # at most B − K = 1
    assert idx(guarded_rows(ppl, k=2, ppl_guard=0.0)) == []
    assert idx(guarded_rows(torch.tensor([5.0, 5, 5, 1]), k=1, ppl_guard=0.25)) == [0]  # ties: lower index


# Ranks exactly anti-correlated, and sample 7's perplexity is an outlier in the Q2 corner.
ANTI_ENT = torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1])


def test_ppl_guard_sets_the_outlier_aside_and_measures_the_bands_on_the_rest():
    # No guard: q = .245 puts {6, 7} in Q2 and {0, 1} in Q4 (4/8); q = .1225 gives Q2 = {7} (PPL > 20.25, entropy
    # <= 1.8575) and Q4 = {0}: 2/8 = r_sample, kept.
    plain = triage(OUTLIER_PPL, ANTI_ENT, TriageSettings(0.25))
    assert idx(plain.kept) == [0, 7] and idx(plain.band_q2) == [7] and idx(plain.guarded) == []
    # Guard 1/8: sample 7 set aside; on the other 7 the target is .25 · 8/7 = 2/7. q = .245 gives 4/7; q = .1225
    # gives Q2 = {6} (PPL > 6.265, entropy <= 2.735) and Q4 = {0} (PPL <= 1.735, entropy > 7.265): 2/7, kept.
    guarded = triage(OUTLIER_PPL, ANTI_ENT, TriageSettings(0.25, ppl_guard=0.125))
    assert idx(guarded.guarded) == [7]
    assert idx(guarded.kept) == [0, 6] and idx(guarded.band_q2) == [6] and idx(guarded.q2like) == [6]
    assert guarded.band_q == pytest.approx(0.1225) and guarded.filled == 0


def test_ppl_guard_keeps_k_through_the_fill_up():
    # Guard 1/4 sets aside 6 and 7. The other six agree on both axes, so no band holds anyone; the rank fill-up
    # wants K = 4 but never adds their Q1 (3, 4, 5: above both medians of the six).
    result = triage(OUTLIER_PPL, RISING_ENT, TriageSettings(0.5, fill_up="rank", ppl_guard=0.25))
    assert idx(result.guarded) == [6, 7]
    assert idx(result.kept) == [0, 1, 2] and result.filled == 3
    # minmax fills from anywhere but the guarded rows: |ppl_n − ent_n| = 0 for all six, lower index first.
    assert idx(triage(OUTLIER_PPL, RISING_ENT, TriageSettings(0.5, ppl_guard=0.25)).kept) == [0, 1, 2, 3]


def test_policy_logs_the_guarded_count():
    decision = QTuningPolicy(0.25, 1.0, ppl_guard=0.125).select(per_sample_stats(OUTLIER_PPL, ANTI_ENT))
    assert decision.metrics["guarded"] == 1.0
    assert idx(decision.sample_keep) == [0, 6]
    assert decision.metrics["thr_ppl_high"] == pytest.approx(6.265, abs=1e-4)  # measured without sample 7


def test_every_bad_setting_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        QTuningPolicy(0.25, 0.5, lam=2.0, fill_up="max", threshold_scope="window", scoring="shared")
    assert str(err.value) == (
        "fill_up='max' must be one of minmax, rank, none; lam=2.0 must be in [0, 1]; threshold_scope=window scores "
        "the whole window before training any of it: it needs scoring=separate, not shared"
    )
