"""The in-batch token pruners (docs/method.md §7): keep rules and scores pinned on hand-built inputs, the model passes
on a tiny random-init Llama."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from qtuning.models import build_char_tokenizer, build_random_llama
from qtuning.ops import scoring_forward
from qtuning.pruning import (
    BatchStats,
    ComboPolicy,
    FastVTokenPolicy,
    PPLTokenPolicy,
    RandomTokenPolicy,
    Rho1TokenPolicy,
    SparseVLMTokenPolicy,
    loss_positions,
    token_level,
)
from qtuning.pruning.token_level import (
    attention_received,
    keep_top_global,
    keep_top_per_sample,
    sparsevlm_scores,
)
from tests.conftest import TINY_OVERRIDES, compose_train


def idx(mask: torch.Tensor) -> list[list[int]]:
    """The kept positions of each row."""
    return [row.nonzero().flatten().tolist() for row in mask]


def hand_stats() -> BatchStats:
    """Two rows of 5 loss positions: row 0 has 4 non-pad (2 prompt, 2 response), row 1 has 5 (1 prompt, 4 response)."""
    nonpad = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    nll = torch.tensor([[0.0, 0.0, 2.0, 0.5, 0.0], [0.0, 3.0, 0.5, 1.0, 0.5]])
    return BatchStats(response_mask=response, nonpad_mask=nonpad, token_nll=nll, sample_idx=torch.arange(2))


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_char_tokenizer()
    return tokenizer, build_random_llama(vocab_size=len(tokenizer), num_hidden_layers=2).eval()


def padded_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two right-padded rows: a 3-character prompt, then the response."""
    rows = [("abc", "defgh"), ("xyz", "uv")]
    length = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for b, (prompt, response) in enumerate(rows):
        ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, len(prompt) : len(ids)] = torch.tensor(ids[len(prompt) :])
        attention_mask[b, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "sample_idx": torch.arange(2)}


# ---- keep rules ----------------------------------------------------------------------------------------------------


def test_keep_top_global_counts_over_the_batch_with_ties_by_flat_index():
    stats = hand_stats()
    # nonpad: N = 9, round(0.5·9) = round(4.5) = 4 (half to even); NLL 3, 2, then the 0.5 ties (flat 3, 7, 9): 3 first
    keep = keep_top_global(stats.token_nll, stats.nonpad_mask, 0.5)
    assert idx(keep) == [[2, 3], [1, 3]]


def test_keep_top_global_gives_a_starved_row_its_best_candidate():
    scores = torch.tensor([[9.0, 8, 7, 6], [1, 3, 2, 3]])
    candidates = torch.ones(2, 4, dtype=torch.bool)
    # round(0.25·8) = 2 would both come from row 0: each row's best goes first (ties: lower index)
    assert idx(keep_top_global(scores, candidates, 0.25)) == [[0], [1]]
    # round(0.1·8) = 1 < 2 rows with candidates: one each
    assert idx(keep_top_global(scores, candidates, 0.1)) == [[0], [1]]
    # round(0.5·8) = 4: the row bests, then the global order
    assert idx(keep_top_global(scores, candidates, 0.5)) == [[0, 1, 2], [1]]


def test_keep_top_per_sample_rounds_per_row_and_keeps_at_least_one():
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.0], [0.5, 0.5, 0.1, 0.9, 0.0]])
    candidates = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    # r = 0.5: round(2.0) = 2 of row 0, round(2.5) = 2 of row 1 (0.9, then the 0.5 tie at the lower index)
    assert idx(keep_top_per_sample(scores, candidates, 0.5)) == [[1, 2], [0, 3]]
    # r = 0.1: round(0.4) = 0 and round(0.5) = 0, raised to 1 each
    assert idx(keep_top_per_sample(scores, candidates, 0.1)) == [[1], [3]]
    # a row without candidates keeps none
    empty = candidates.clone()
    empty[0] = False
    assert idx(keep_top_per_sample(scores, empty, 0.1)) == [[], [3]]


@pytest.mark.parametrize("rule", [keep_top_global, keep_top_per_sample])
def test_ratio_one_keeps_every_candidate(rule):
    stats = hand_stats()
    for candidates in (stats.nonpad_mask, stats.response_mask):
        assert torch.equal(rule(torch.rand(2, 5), candidates, 1.0), candidates)


# ---- random and ppl ------------------------------------------------------------------------------------------------


def test_random_same_seed_same_draws_and_resumes_from_its_state():
    stats = hand_stats()
    a, b = RandomTokenPolicy(0.5, seed=3), RandomTokenPolicy(0.5, seed=3)
    first = a.select(stats).token_keep
    assert torch.equal(first, b.select(stats).token_keep)
    assert int(first.sum()) == 4 and not (first & ~stats.nonpad_mask).any()
    state = a.state_dict()
    nxt = a.select(stats).token_keep
    b.load_state_dict(state)
    assert torch.equal(b.select(stats).token_keep, nxt)


def test_ppl_keeps_the_highest_nll():
    decision = PPLTokenPolicy(0.5).select(hand_stats())
    assert decision.sample_keep.all()
    assert idx(decision.token_keep) == [[2, 3], [1, 3]]
    assert decision.metrics["resp_token_keep"] == pytest.approx(4 / 6)


def test_loss_norm_sets_the_candidate_count():
    stats = hand_stats()  # 9 non-pad positions, 6 response tokens
    nonpad = PPLTokenPolicy(0.5, loss_norm="nonpad").select(stats).token_keep
    response = PPLTokenPolicy(0.5, loss_norm="response").select(stats).token_keep
    assert int(nonpad.sum()) == 4 and int(response.sum()) == 3  # round(4.5) = 4, round(3.0) = 3
    assert idx(response) == [[2], [1, 3]]
    assert int(RandomTokenPolicy(0.5, loss_norm="response").select(stats).token_keep.sum()) == 3


# ---- FastV and SparseVLM -------------------------------------------------------------------------------------------


def test_attention_received_averages_heads_and_valid_queries():
    # one row of 3 tokens, the last one padding; head 1 attends only to token 0
    attn = torch.tensor(
        [
            [
                [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]],
                [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
            ]
        ]
    )  # [1, 2, 3, 3]
    received = attention_received(attn, torch.tensor([[1, 1, 0]]))
    # head mean over the 2 valid queries: token 0 (1 + .75) / 2, token 1 (0 + .25) / 2, token 2 padding
    assert received[0].tolist() == pytest.approx([0.875, 0.125, 0.0])


def test_fastv_keeps_the_most_attended_targets():
    # queries attend mostly to token 2, then 4; loss position i is scored by token i + 1
    weights = torch.tensor([0.05, 0.05, 0.5, 0.1, 0.3])
    attn = weights.expand(1, 1, 5, 5)  # [1, 1, 5, 5]
    received = attention_received(attn, torch.ones(1, 5, dtype=torch.long))
    keep = keep_top_per_sample(received[:, 1:], torch.ones(1, 4, dtype=torch.bool), 0.5)
    assert idx(keep) == [[1, 3]]  # predicting token 2 and token 4


def test_fastv_enrich_and_select_on_a_tiny_llama(tiny):
    tokenizer, model = tiny
    batch = padded_batch(tokenizer)
    stats = BatchStats.from_masks(batch["labels"], batch["attention_mask"], batch["sample_idx"])
    policy = FastVTokenPolicy(0.5)
    decision = policy.select(policy.enrich(model, batch, stats))
    assert model.config._attn_implementation == "sdpa"  # restored after the eager pass
    candidates = loss_positions(stats, "nonpad")
    assert decision.sample_keep.all() and not (decision.token_keep & ~candidates).any()
    assert decision.token_keep.sum(1).tolist() == [4, 2]  # round(0.5·7) = 4 (half to even of 3.5), round(0.5·4) = 2
    # the same as scoring with the full output_attentions map of the last layer
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    model.set_attn_implementation("sdpa")
    received = attention_received(attn.attentions[-1], batch["attention_mask"])
    assert torch.equal(decision.token_keep, keep_top_per_sample(received[:, 1:], candidates, 0.5))
    assert 0 < decision.metrics["resp_token_keep"] <= 1


def test_sparsevlm_scores_on_hand_built_states():
    received = torch.tensor([[0.6, 0.2, 0.2, 0.0]])
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # the last is padding
    scores = sparsevlm_scores(received, hidden, torch.tensor([[1, 1, 1, 0]]))
    # mean cosine to the other two valid tokens: (1 + 0) / 2, (1 + 0) / 2, (0 + 0) / 2
    assert scores[0].tolist() == pytest.approx([0.3 - 0.25, 0.1 - 0.25, 0.1, 0.0])


def test_sparsevlm_direction_fixed_vs_inverted(monkeypatch):
    stats = hand_stats()
    received = torch.tensor([[0.3, 0.1, 0.2, 0.3, 0.1, 0.0], [0.1, 0.2, 0.1, 0.2, 0.3, 0.1]])
    hidden = torch.zeros(2, 6, 2)  # all-zero states: cosine 0, the score is half the attention received
    monkeypatch.setattr(token_level, "last_layer_pass", lambda model, batch: (received, hidden))
    batch = {"attention_mask": torch.ones(2, 6, dtype=torch.long)}
    fixed, inverted = SparseVLMTokenPolicy(0.5), SparseVLMTokenPolicy(0.5, inverted=True)
    fixed = fixed.select(fixed.enrich(None, batch, stats)).token_keep
    inverted = inverted.select(inverted.enrich(None, batch, stats)).token_keep
    # targets' received: row 0 [.1, .2, .3, .1] (4 candidates, keep 2), row 1 [.2, .1, .2, .3, .1] (5, keep 2)
    assert idx(fixed) == [[1, 2], [0, 3]]
    assert idx(inverted) == [[0, 3], [1, 4]]


# ---- Rho-1 ---------------------------------------------------------------------------------------------------------


def test_rho1_keeps_the_largest_excess_loss():
    stats = hand_stats()
    stats.ref_nll = torch.tensor([[0.0, 0.0, 2.5, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0]])
    # excess: row 0 [0, 0, -.5, .5], row 1 [0, 2, .5, 0, .5]; top 4: 2, then the .5s at flat 3, 7, 9
    decision = Rho1TokenPolicy(0.5, reference=torch.nn.Identity()).select(stats)
    assert idx(decision.token_keep) == [[3], [1, 2, 4]]


def test_rho1_identical_reference_keeps_the_first_k(tiny):
    tokenizer, model = tiny
    batch = padded_batch(tokenizer)
    stats = scoring_forward(model, batch)
    policy = Rho1TokenPolicy(0.8, reference=model)
    enriched = policy.enrich(model, batch, stats)
    decision = policy.select(enriched)
    assert torch.equal(enriched.ref_nll, stats.token_nll)  # excess 0 everywhere: all ties
    # 7 + 4 non-pad positions, round(0.8·11) = 9: the first nine in flat order
    assert idx(decision.token_keep) == [[0, 1, 2, 3, 4, 5, 6], [0, 1]]


def test_rho1_needs_a_reference_model(tmp_path, tiny):
    with pytest.raises(ValueError, match="pruner.token.ref_model"):
        Rho1TokenPolicy(0.5, ref_model=None)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tiny[0]))
    pl_module = SimpleNamespace(model=tiny[1], device=torch.device("cpu"))
    with pytest.raises(ValueError, match="pruner.token.ref_model=.*missing: cannot load it"):
        Rho1TokenPolicy(0.5, ref_model=str(tmp_path / "missing")).setup(trainer, pl_module, "fit")


def test_rho1_loads_the_reference_and_checks_its_tokenizer(tmp_path, tiny):
    tokenizer, model = tiny
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tokenizer))
    pl_module = SimpleNamespace(model=model, device=torch.device("cpu"))
    model.save_pretrained(tmp_path / "same")
    tokenizer.save_pretrained(tmp_path / "same")
    policy = Rho1TokenPolicy(0.5, ref_model=str(tmp_path / "same"))
    policy.setup(trainer, pl_module, "fit")
    assert not policy.reference.training and not any(p.requires_grad for p in policy.reference.parameters())

    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    model.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="must use the same tokenizer") as err:
        Rho1TokenPolicy(0.5, ref_model=str(tmp_path / "other")).setup(trainer, pl_module, "fit")
    assert str(tmp_path / "other") in str(err.value) and "training tokenizer" in str(err.value)


# ---- every policy --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [
        RandomTokenPolicy(1.0),
        PPLTokenPolicy(1.0),
        FastVTokenPolicy(1.0),
        SparseVLMTokenPolicy(1.0, inverted=True),
        Rho1TokenPolicy(1.0, reference=torch.nn.Identity()),
    ],
    ids=lambda p: type(p).__name__,
)
@pytest.mark.parametrize("loss_norm", ["nonpad", "response"])
def test_ratio_one_is_the_identity(policy, loss_norm):
    policy.loss_norm = loss_norm
    stats = hand_stats()
    decision = policy.select(policy.enrich(None, {}, stats))  # no model pass at ratio 1
    assert decision.sample_keep.all()
    assert torch.equal(decision.token_keep, loss_positions(stats, loss_norm))
    assert decision.metrics["resp_token_keep"] == 1.0


@pytest.mark.parametrize("policy_cls", [RandomTokenPolicy, PPLTokenPolicy, SparseVLMTokenPolicy])
def test_every_row_with_candidates_keeps_a_token(policy_cls, monkeypatch):
    stats = hand_stats()
    received = torch.rand(2, 6)
    monkeypatch.setattr(token_level, "last_layer_pass", lambda model, batch: (received, torch.rand(2, 6, 4)))
    batch = {"attention_mask": torch.ones(2, 6, dtype=torch.long)}
    policy = policy_cls(0.05)
    decision = policy.select(policy.enrich(None, batch, stats))
    assert decision.token_keep.any(1).all()


@pytest.mark.parametrize("token", ["none", "random", "ppl", "fastv", "sparsevlm", "rho1"])
def test_token_configs_instantiate_in_the_combo(tmp_path, token):
    overrides = [*TINY_OVERRIDES, "pruner=combo", f"pruner/token={token}", "budget=s25_t50"]
    if token == "rho1":
        overrides.append(f"pruner.token.ref_model={tmp_path}")
    policy = instantiate(compose_train(overrides, tmp_path).pruner)
    assert isinstance(policy, ComboPolicy) and policy.token.loss_norm == "nonpad"
    if token != "none":
        assert policy.token.r_token == 0.5
