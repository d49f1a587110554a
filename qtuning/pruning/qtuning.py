"""Q-Tuning (arXiv 2509.23873): Error–Uncertainty triage of samples, then asymmetric token pruning.

Each rule is one of docs/method.md §2–5 (the authors' code); each is a small pure function over tensors:
1. `BatchStats.sample_ppl` and `sample_entropy`: the error and uncertainty of each sample.
2. `bisect_bands`: the band width q whose outer bands (Q2: top-q PPL ∩ bottom-q entropy; Q4: bottom-q PPL ∩
   top-q entropy) hold about r_sample of the batch.
3. `fill_up`: tops the kept set up to K = max(1, round(B · r_sample)) by |ppl_n − ent_n|; never truncates
   (``rank``: a noise-robust variant, see docs/noise_probe.md). `triage` runs 2 and 3 under `TriageSettings`.
4. `token_scores`, `drop_highest` and `drop_per_sample`: in Q2 and Q2-like samples only, drop the response tokens
   whose own and neighbours' perplexity is highest, within a batch-level (default) or per-sample budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtuning.ops.stats import BatchStats
from qtuning.pruning.base import (
    AUTHORS_LOSS_NORM,
    DEFAULT_SCORING,
    LOSS_NORMS,
    SCORINGS,
    PruneDecision,
    PruningPolicy,
    keep_count,
    loss_positions,
)

FILL_UP_RULES = ("minmax", "rank", "none")
TOKEN_BUDGETS = ("batch", "per_sample")
ENTROPY_SCOPES = ("nonpad", "response")
THRESHOLD_SCOPES = ("local", "global", "window")


@dataclass(frozen=True)
class TriageSettings:
    """Stage 1's settings (docs/method.md §3); every default is the authors'.

    Args:
        r_sample: the target fraction of samples kept, K = max(1, round(B · r_sample)).
        bisect_iters, bisect_tol, q_max: the bisection over the band width q ∈ [0, q_max].
        fill_up: how the kept set is topped up to K: ``minmax`` (the authors'), ``rank`` (rank-scaled, never from Q1)
            or ``none`` (the bands only); see `fill_up`.
        ppl_guard: the fraction of the batch with the highest perplexity set aside as suspected noise before the
            triage (0, the authors': none); see `guarded_rows` and docs/noise_probe.md.
    """

    r_sample: float
    bisect_iters: int = 10
    bisect_tol: float = 0.01
    q_max: float = 0.49
    fill_up: str = "minmax"
    ppl_guard: float = 0.0

    def problems(self) -> list[str]:
        """Every setting outside its range, each named: all of them are reported at once."""
        checks = [
            (0.0 < self.r_sample <= 1.0, f"r_sample={self.r_sample} must be in (0, 1]"),
            (self.bisect_iters >= 1, f"bisect_iters={self.bisect_iters} must be at least 1"),
            (self.bisect_tol > 0, f"bisect_tol={self.bisect_tol} must be > 0"),
            (0.0 < self.q_max < 0.5, f"q_max={self.q_max} must be in (0, 0.5)"),
            (self.fill_up in FILL_UP_RULES, f"fill_up={self.fill_up!r} must be one of {', '.join(FILL_UP_RULES)}"),
            (0.0 <= self.ppl_guard < 1.0, f"ppl_guard={self.ppl_guard} must be in [0, 1)"),
        ]
        return [message for ok, message in checks if not ok]

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise ValueError("; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class QTuningSettings(TriageSettings):
    """Every Q-Tuning setting (docs/method.md §2–5, each switch in §9), built once from the ``pruner`` config node;
    stage 1's are `TriageSettings`'. Every default is the authors'.

    Args:
        r_token: the token budget's ratio; 1 prunes no token.
        lam: λ, the weight of the neighbours in the token score.
        neighbor_mean: divide the neighbour sum by 2 (the slime port's form) instead of the authors' plain sum.
        token_budget: ``batch`` (authors): drop ``T_all − round(T_all·r_s·r_t) − removed`` tokens ranked across all
            Q2/Q2-like responses; ``per_sample``: keep ceil(r_token · n_resp) tokens of each Q2/Q2-like sample.
        entropy_scope: average the entropy over ``nonpad`` positions (authors) or ``response`` positions.
        loss_norm, scoring: see `PruningPolicy`.
        threshold_scope: over which rows the module makes one decision (`qtuning.module.StepScope`): ``local``
            (authors): each device's micro-batch; ``global``: every device's micro-batch, gathered; ``window``: as
            ``global``, over every micro-batch of the optimizer step (scored first, the kept rows then re-packed).
    """

    r_token: float
    lam: float = 0.5
    neighbor_mean: bool = False
    token_budget: str = "batch"
    entropy_scope: str = "nonpad"
    loss_norm: str = AUTHORS_LOSS_NORM
    scoring: str = DEFAULT_SCORING
    threshold_scope: str = "local"

    def problems(self) -> list[str]:
        def choice(name: str, options: tuple[str, ...]) -> tuple[bool, str]:
            value = getattr(self, name)
            return value in options, f"{name}={value!r} must be one of {', '.join(options)}"

        checks = [
            (0.0 < self.r_token <= 1.0, f"r_token={self.r_token} must be in (0, 1]"),
            (0.0 <= self.lam <= 1.0, f"lam={self.lam} must be in [0, 1]"),
            choice("token_budget", TOKEN_BUDGETS),
            choice("entropy_scope", ENTROPY_SCOPES),
            choice("loss_norm", LOSS_NORMS),
            choice("scoring", SCORINGS),
            choice("threshold_scope", THRESHOLD_SCOPES),
            (
                self.threshold_scope != "window" or self.scoring == "separate",
                "threshold_scope=window scores the whole window before training any of it: it needs "
                f"scoring=separate, not {self.scoring}",
            ),
        ]
        return super().problems() + [message for ok, message in checks if not ok]


def band_masks(ppl: Tensor, ent: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """Q2 = top-q PPL ∩ bottom-q entropy; Q4 = bottom-q PPL ∩ top-q entropy (linear-interpolation quantiles)."""
    q2 = (ppl > torch.quantile(ppl, 1 - q)) & (ent <= torch.quantile(ent, q))
    q4 = (ppl <= torch.quantile(ppl, q)) & (ent > torch.quantile(ent, 1 - q))
    return q2, q4


def bisect_bands(ppl: Tensor, ent: Tensor, target: float, settings: TriageSettings) -> tuple[Tensor, Tensor, float]:
    """Bisection over one band width q ∈ [0, q_max] (the same q on both axes) for bands holding ``target`` of the
    batch; the last iteration's Q2, Q4 and q."""
    lo, hi = 0.0, settings.q_max
    batch = ppl.numel()
    for _ in range(settings.bisect_iters):
        q = (lo + hi) / 2
        q2, q4 = band_masks(ppl, ent, q)
        frac = float(q2.sum() + q4.sum()) / batch
        if abs(frac - target) < settings.bisect_tol:
            break
        if frac < target:
            lo = q
        else:
            hi = q
    return q2, q4, q


def min_max(x: Tensor) -> Tensor:
    """Scale to [0, 1] within the batch; a constant vector becomes 0."""
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def median_quadrants(ppl: Tensor, ent: Tensor) -> Tensor:
    """``[B]`` int 1–4 by the batch medians (``>`` median is high): Q1 high/high, Q2 high PPL/low entropy, Q3
    low/low, Q4 low PPL/high entropy."""
    high_ppl = ppl > torch.quantile(ppl, 0.5)
    high_ent = ent > torch.quantile(ent, 0.5)
    quadrant = torch.full_like(ppl, 3, dtype=torch.long)
    quadrant[high_ppl & high_ent] = 1
    quadrant[high_ppl & ~high_ent] = 2
    quadrant[~high_ppl & high_ent] = 4
    return quadrant


def rank_scale(x: Tensor) -> Tensor:
    """Ranks within the batch scaled to [0, 1] (smallest 0, largest 1); ties share their average rank."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank of each distinct value's first occurrence
    average = first.to(torch.float32) + (counts - 1) / 2
    return average[inverse] / max(1, x.numel() - 1)


def fill_up(ppl: Tensor, ent: Tensor, kept: Tensor, q2like: Tensor, k: int, rule: str) -> tuple[Tensor, Tensor, int]:
    """Add up to K − |kept| other samples with the largest |ppl_n − ent_n| (ties: lower index first).

    ``minmax`` (authors): min-max-scaled scores, any sample may be added. ``rank``: rank-scaled scores, so one
    extreme perplexity cannot stretch the scale, and no sample above both batch medians (Q1, harmful noise) is added.
    An added sample is Q2-like (its tokens may be pruned) if ppl_n ≥ ent_n, else Q4-like. Returns the new kept and
    Q2-like masks and the number added.
    """
    missing = k - int(kept.sum())
    if missing <= 0 or rule == "none":
        return kept, q2like, 0
    eligible = ~kept
    if rule == "rank":
        ppl_n, ent_n = rank_scale(ppl), rank_scale(ent)
        eligible &= median_quadrants(ppl, ent) != 1
    else:
        ppl_n, ent_n = min_max(ppl), min_max(ent)
    score = (ppl_n - ent_n).abs().masked_fill(~eligible, -math.inf)
    added = torch.sort(score, descending=True, stable=True).indices[: min(missing, int(eligible.sum()))]
    kept, q2like = kept.clone(), q2like.clone()
    kept[added] = True
    q2like[added] = ppl_n[added] >= ent_n[added]
    return kept, q2like, len(added)


def token_scores(token_nll: Tensor, response_mask: Tensor, lam: float, neighbor_mean: bool = False) -> Tensor:
    """``[B, T-1]``: s_i = (1 − λ)·p_i + λ·(p_{i−1} + p_{i+1}), p = exp(nll) on the response, 0 elsewhere and beyond."""
    p = torch.exp(token_nll) * response_mask  # [B, T-1]
    neighbors = F.pad(p[:, :-1], (1, 0)) + F.pad(p[:, 1:], (0, 1))  # p_{i-1} + p_{i+1}, zero past the ends
    if neighbor_mean:
        neighbors = neighbors / 2
    return (1 - lam) * p + lam * neighbors


def drop_highest(scores: Tensor, candidates: Tensor, n_drop: int) -> Tensor:
    """``[B, T-1]`` bool: the ``n_drop`` highest-scoring candidates across the batch (ties: lower flat index)."""
    flat = scores.masked_fill(~candidates, -math.inf).flatten()
    dropped = torch.zeros_like(flat, dtype=torch.bool)
    dropped[torch.sort(flat, descending=True, stable=True).indices[:n_drop]] = True
    return dropped.view_as(candidates)


def drop_per_sample(scores: Tensor, candidates: Tensor, r_token: float) -> Tensor:
    """``[B, T-1]`` bool: per row, all candidates but the ceil(r_token · n) lowest-scoring (ties: lower index)."""
    keep_n = torch.ceil(r_token * candidates.sum(1)).long()  # [B]
    order = torch.sort(scores.masked_fill(~candidates, math.inf), dim=1, stable=True).indices  # ascending
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank >= keep_n[:, None])


def guarded_rows(ppl: Tensor, k: int, ppl_guard: float) -> Tensor:
    """``[B]`` bool: the floor(ppl_guard · B) highest-perplexity samples (at most B − K; ties: lower index first),
    set aside as suspected noise before the triage."""
    n_guard = min(math.floor(ppl_guard * ppl.numel()), ppl.numel() - k)
    guarded = torch.zeros_like(ppl, dtype=torch.bool)
    guarded[torch.sort(ppl, descending=True, stable=True).indices[: max(0, n_guard)]] = True
    return guarded


@dataclass
class Triage:
    """Stage 1's outcome for one batch."""

    kept: Tensor  # [B] bool
    q2like: Tensor  # [B] bool: kept samples whose tokens may be pruned (Q2 and Q2-like fill-ups)
    band_q2: Tensor  # [B] bool: Q2 by the bands
    band_q4: Tensor  # [B] bool: Q4 by the bands
    band_q: float
    filled: int
    guarded: Tensor  # [B] bool: set aside by the perplexity guard before the triage


def triage(ppl: Tensor, ent: Tensor, settings: TriageSettings) -> Triage:
    """Stage 1 (docs/method.md §3): bands by bisection, then the fill-up to K.

    With ``ppl_guard`` > 0 the highest-perplexity samples are set aside first (`guarded_rows`) and the bands and the
    fill-up run on the rest with the same K: the bands' target becomes r_sample · B / |rest|.
    """
    k = keep_count(ppl.numel(), settings.r_sample)
    guarded = guarded_rows(ppl, k, settings.ppl_guard)
    rest = (~guarded).nonzero().squeeze(1)  # [B'] rows that take part
    ppl_r, ent_r = ppl[rest], ent[rest]
    q2, q4, q = bisect_bands(ppl_r, ent_r, settings.r_sample * ppl.numel() / rest.numel(), settings)
    kept, q2like, filled = fill_up(ppl_r, ent_r, q2 | q4, q2.clone(), k, settings.fill_up)

    def scatter(rows: Tensor) -> Tensor:  # [B'] -> [B], guarded rows False
        return torch.zeros_like(guarded).index_put((rest,), rows)

    return Triage(scatter(kept), scatter(q2like), scatter(q2), scatter(q4), q, filled, guarded)


class QTuningPolicy(PruningPolicy):
    """Q-Tuning with the authors' choices as defaults: ``QTuningPolicy(r_sample, r_token, **settings)``, any other
    `QTuningSettings` by name (every problem with them reported at once)."""

    needs_scores = True

    def __init__(self, r_sample: float, r_token: float, **settings: Any) -> None:
        self.settings = QTuningSettings(r_sample=r_sample, r_token=r_token, **settings)
        super().__init__(self.settings.loss_norm, self.settings.scoring)
        self.threshold_scope = self.settings.threshold_scope

    def dropped_tokens(self, stats: BatchStats, result: Triage) -> Tensor:
        """Stage 2 (docs/method.md §4): ``[B, T-1]`` bool, the response tokens of Q2/Q2-like samples removed from the
        loss."""
        candidates = stats.response_mask & (result.kept & result.q2like)[:, None]  # [B, T-1]
        if self.settings.r_token >= 1.0:
            return torch.zeros_like(candidates)
        scores = token_scores(stats.token_nll, stats.response_mask, self.settings.lam, self.settings.neighbor_mean)
        if self.settings.token_budget == "per_sample":
            return drop_per_sample(scores, candidates, self.settings.r_token)
        total = int(stats.nonpad_mask.sum())
        target = round(total * self.settings.r_sample * self.settings.r_token)
        removed = int(stats.nonpad_mask[~result.kept].sum())
        n_drop = min(max(0, total - target - removed), int(candidates.sum()))
        return drop_highest(scores, candidates, n_drop)

    def select(self, stats: BatchStats) -> PruneDecision:
        """Stages 1 and 2 on the rows it is given (one device's, or every device's, gathered by the module)."""
        ppl, ent = stats.sample_ppl(), stats.sample_entropy(self.settings.entropy_scope)  # [B], [B]
        result = triage(ppl, ent, self.settings)
        dropped = self.dropped_tokens(stats, result)  # [B, T-1]
        token_keep = loss_positions(stats, self.loss_norm) & result.kept[:, None] & ~dropped
        quadrant = median_quadrants(ppl, ent)
        return PruneDecision(
            sample_keep=result.kept,
            token_keep=token_keep,
            quadrant=quadrant,
            ppl=ppl,
            entropy=ent,
            metrics=self.dashboard(stats, result, dropped, quadrant, ppl, ent),
        )

    def dashboard(
        self, stats: BatchStats, result: Triage, dropped: Tensor, quadrant: Tensor, ppl: Tensor, ent: Tensor
    ) -> dict[str, float]:
        """Per-step scalars: quadrant populations and means, band width and thresholds, fill-ups, realised Q2
        token keep."""
        batch = stats.batch_size
        q = result.band_q
        ppl_in, ent_in = ppl[~result.guarded], ent[~result.guarded]  # the rows the bands were measured on
        metrics: dict[str, float] = {
            # the samples this decision was made over (a micro-batch, the global batch or a window) and the
            # realised fraction of them kept
            "decision_rows": float(batch),
            "decision_keep": float(result.kept.sum()) / batch,
            "band_q": q,
            # the band thresholds of the last bisection step: Q2 = PPL > ppl_high & entropy <= ent_low, etc.
            "thr_ppl_high": float(torch.quantile(ppl_in, 1 - q)),
            "thr_ppl_low": float(torch.quantile(ppl_in, q)),
            "thr_ent_low": float(torch.quantile(ent_in, q)),
            "thr_ent_high": float(torch.quantile(ent_in, 1 - q)),
            "filled": float(result.filled),
            "guarded": float(result.guarded.sum()),
            "band_q2": float(result.band_q2.sum()),
            "band_q4": float(result.band_q4.sum()),
        }
        for k in range(1, 5):
            members = quadrant == k
            count = int(members.sum())
            metrics[f"q{k}"] = float(count)
            metrics[f"q{k}_frac"] = count / batch
            if count:
                metrics[f"q{k}_ppl"] = float(ppl[members].mean())
                metrics[f"q{k}_entropy"] = float(ent[members].mean())
        q2_resp = stats.response_mask & (result.kept & result.q2like)[:, None]
        n_q2_resp = int(q2_resp.sum())
        if n_q2_resp:
            metrics["q2_resp_token_keep"] = 1.0 - float((dropped & q2_resp).sum()) / n_q2_resp
        return metrics
