"""Padding-free passes (``data.padding_free``): the packing by hand, then packed against right-padded rows on a tiny
Llama in fp32 with samples of very different lengths: the same statistics, decisions, loss and gradients for every
kind of step, and over short runs the same losses while fewer positions go through the model."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback

from qtuning import IGNORE_INDEX
from qtuning.errors import QTuningError
from qtuning.models import build_model, build_tokenizer
from qtuning.module import SFTModule
from qtuning.ops import BatchStats, Layout
from qtuning.ops.layout import balanced_bins, packed_rows, packing_leak, packing_problem
from qtuning.train import train
from tests.conftest import add_callbacks, run_cli, tiny_cli_args

LENGTHS = [5, 40, 12, 64, 3, 30, 20, 50]  # tokens of each sample of the batch
PROMPTS = [2, 10, 4, 20, 1, 8, 6, 15]  # of which the prompt (label −100)


def test_balanced_bins_fill_the_fewest_rows_evenly():
    # 154 tokens into rows of 64: 3 rows; longest first, each into the emptiest row: 64 | 40 + 5 | 30 + 12 + 3
    assert balanced_bins([5, 40, 12, 64, 3, 30], 64) == [[3], [1, 0], [5, 2, 4]]
    assert balanced_bins([40, 40, 40], 64) == [[0], [1], [2]]  # 2 rows would need one of 80: a third row
    assert balanced_bins([7], 64) == [[0]]


def hand_batch() -> dict[str, torch.Tensor]:
    """Three samples of 3, 5 and 2 tokens, right-padded to 5; the first token of each is prompt."""
    input_ids = torch.tensor([[11, 12, 13, 0, 0], [21, 22, 23, 24, 25], [31, 32, 0, 0, 0]])
    mask = (input_ids != 0).long()
    labels = torch.where(mask.bool(), input_ids, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "sample_idx": torch.tensor([7, 8, 9])}


def test_packed_rows_restart_positions_and_never_predict_across_a_boundary():
    run = packed_rows(hand_batch(), torch.tensor([0, 1, 2]), capacity=8)
    # 10 tokens into rows of 8: 2 rows, balanced: [sample 1] and [sample 0, sample 2], 5 wide
    assert run.inputs["input_ids"].tolist() == [[21, 22, 23, 24, 25], [11, 12, 13, 31, 32]]
    assert run.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert run.inputs["labels"].tolist() == [[-100, 22, 23, 24, 25], [-100, 12, 13, -100, 32]]
    assert run.positions_run == 10 and run.width == 5
    # per-target values [N, T-1] go to the pass [R, L-1] and come back; sample 0's last token predicts nothing
    values = torch.arange(1.0, 13.0).view(3, 4)
    placed = run.positions(values)
    assert placed.tolist() == [[5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 0.0, 9.0]]
    assert run.samples(placed).tolist() == [[1.0, 2.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0], [9.0, 0.0, 0.0, 0.0]]


def test_a_padded_pass_is_the_rows_trimmed_to_their_longest():
    run = Layout().rows(hand_batch(), torch.tensor([0, 2]))
    assert run.inputs["input_ids"].tolist() == [[11, 12, 13], [31, 32, 0]] and "position_ids" not in run.inputs
    values = torch.ones(2, 2)
    assert run.samples(values) is values and run.positions(values) is values


def varied_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rows, width = len(LENGTHS), max(LENGTHS)
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, (n, prompt) in enumerate(zip(LENGTHS, PROMPTS, strict=True)):
        input_ids[i, :n] = torch.randint(1, vocab_size, (n,), generator=generator)
        labels[i, prompt:n] = input_ids[i, prompt:n]
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "sample_idx": torch.arange(rows)}


def one_step(cfg, packed: bool, batch=None, model=None):
    """Score, decide and train one batch of `LENGTHS`, backward included: what the step saw and did."""
    tokenizer = build_tokenizer(cfg.model, "")
    model = model or build_model(cfg.model, "", vocab_size=len(tokenizer), seed=cfg.seed)
    batch = batch or varied_batch(len(tokenizer))
    layout = Layout(packed=packed, capacity=cfg.data.max_length)
    module = SFTModule(model, instantiate(cfg.pruner), optimizer=torch.optim.SGD, layout=layout)
    scored = module.score(batch)
    decision = module.decide(scored.stats)
    passes = module.train_kept(batch, scored, decision, batch_idx=0)
    loss = sum(p.loss_sum for p in passes)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    positions = scored.positions + sum(p.forward_positions for p in passes)
    return scored.stats, decision, loss.detach(), grads, positions


def assert_same_stats(packed: BatchStats, padded: BatchStats) -> None:
    assert torch.equal(packed.response_mask, padded.response_mask) and torch.equal(
        packed.nonpad_mask, padded.nonpad_mask
    )
    for name in ("token_nll", "token_entropy", "token_scores", "ref_nll"):
        a, b = getattr(packed, name), getattr(padded, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


STEPS = {
    "full": ["pruner=none"],
    "qtuning_separate": ["pruner=qtuning", "budget=s50_t70"],
    "qtuning_shared": ["pruner=qtuning", "budget=s50_t70", "pruner.scoring=shared"],
    "combo_fastv": ["pruner=combo", "pruner/sample=none", "pruner/token=fastv", "budget=s50_t70"],
    "combo_ppl": ["pruner=combo", "pruner/sample=none", "pruner/token=ppl", "budget=s50_t70"],
    "lora_qtuning": [
        "pruner=qtuning",
        "budget=s50_t70",
        "model.lora.enabled=true",
        "model.lora.target_modules=[q_proj,v_proj,gate_proj]",
    ],  # fmt: skip
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_packed_passes_give_the_padded_statistics_decisions_loss_and_gradients(tiny_cfg, step):
    cfg = tiny_cfg(*STEPS[step], "data.batch_size=4", "data.max_length=64")  # scoring passes of 4 rows
    model = build_model(cfg.model, "", vocab_size=len(build_tokenizer(cfg.model, "")), seed=cfg.seed)
    padded = one_step(cfg, packed=False, model=copy.deepcopy(model))  # LoRA's A is drawn from the global seed
    packed = one_step(cfg, packed=True, model=model)
    assert_same_stats(packed[0], padded[0])
    assert torch.equal(packed[1].sample_keep, padded[1].sample_keep)
    assert torch.equal(packed[1].token_keep, padded[1].token_keep)
    if step != "full":
        assert 0 < int(padded[1].sample_keep.sum()) < len(LENGTHS) or not padded[1].token_keep.all()  # it pruned
    torch.testing.assert_close(packed[2], padded[2], rtol=1e-5, atol=0)
    assert packed[3].keys() == padded[3].keys() and padded[3]
    for name, grad in padded[3].items():
        rel = (packed[3][name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert rel < 1e-5, (name, float(rel))
    assert packed[4] < padded[4]  # fewer positions through the model


def test_a_forward_that_keeps_a_cache_lets_packed_samples_see_each_other_and_is_caught(tiny_cfg, caplog):
    cfg = tiny_cfg("pruner=qtuning", "budget=s50_t70", "data.max_length=64")
    tokenizer = build_tokenizer(cfg.model, "")
    model = build_model(cfg.model, "", vocab_size=len(tokenizer), seed=cfg.seed)
    assert packing_leak(model) < 1e-5 and packing_problem(model) is None  # use_cache=False: nothing to catch
    leaky = copy.deepcopy(model)
    forward = leaky.forward
    leaky.forward = lambda *args, use_cache=None, **kwargs: forward(*args, use_cache=True, **kwargs)
    assert packing_leak(leaky) > 0.1
    padded_stats = one_step(cfg, packed=False, model=copy.deepcopy(model))[0]
    leaky_stats = one_step(cfg, packed=True, model=leaky)[0]
    assert not torch.allclose(leaky_stats.token_nll, padded_stats.token_nll, atol=1e-3)  # the leak the check stops
    # data.padding_free=true: the run stops before its first pass; auto: it runs padded passes, and says so
    required = SFTModule(leaky, instantiate(cfg.pruner), torch.optim.SGD, layout=Layout(True, 64, required=True))
    with pytest.raises(QTuningError, match="data.padding_free=true: packed samples see each other in LlamaForCausalLM"):
        required.check_layout()
    auto = SFTModule(leaky, instantiate(cfg.pruner), torch.optim.SGD, layout=Layout(True, 64))
    auto.check_layout()
    assert auto.layout == Layout() and "data.padding_free=auto: packed samples see each other" in caplog.text


class StepLog(Callback):
    """Each optimizer step's logged loss and positions."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        self.rows.append(tuple(float(logged[k]) for k in ("train/loss", "prune/fwd_tokens", "prune/bwd_tokens")))


RUNS = {
    "full": ["pruner=none"],
    "qtuning_window": [
        "pruner=qtuning",
        "budget=s50_t70",
        "pruner.threshold_scope=window",
        "data.batch_size=2",
        "trainer.accumulate_grad_batches=3",
    ],  # fmt: skip
}


def varied_pairs(path: Path, rows: int = 40) -> Path:
    """Prompt/completion pairs of 3 to 100 characters (the tiny tokenizer's tokens), lengths drawn seeded."""
    draw = random.Random(0)
    words = "the a model learns of each sample its own tokens".split()
    with path.open("w") as f:
        for _ in range(rows):
            prompt = " ".join(draw.choices(words, k=draw.randint(1, 8)))
            completion = " ".join(draw.choices(words, k=draw.randint(1, 16)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_short_packed_run_logs_the_padded_losses_over_fewer_positions(tiny_cfg, tmp_path, monkeypatch, run):
    data = varied_pairs(tmp_path / "varied.jsonl")
    results = {}
    for packed in (False, True):
        log = StepLog()
        cfg = tiny_cfg(*RUNS[run], "trainer.max_steps=4", f"data.path={data}", "data.max_length=160",
                       f"data.padding_free={packed}")  # fmt: skip
        with monkeypatch.context() as patch:
            add_callbacks(patch, log)
            metrics, objects = train(cfg)
        weights = {k: p.detach().clone() for k, p in objects["module"].model.named_parameters()}
        results[packed] = (log.rows, weights, objects["module"].token_totals, metrics)
    (padded_rows, padded_weights, padded_totals, padded_metrics) = results[False]
    (packed_rows_, packed_weights, packed_totals, packed_metrics) = results[True]
    assert len(packed_rows_) == len(padded_rows) >= 4
    for (loss, fwd, bwd), (ref_loss, ref_fwd, ref_bwd) in zip(packed_rows_, padded_rows, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert fwd <= ref_fwd and bwd <= ref_bwd
    for name, weight in padded_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, rtol=1e-5, atol=1e-6)
    assert packed_metrics["val/loss"] == pytest.approx(padded_metrics["val/loss"], rel=1e-5)
    assert packed_totals["train/response_tokens_total"] == padded_totals["train/response_tokens_total"]
    assert packed_totals["prune/fwd_tokens_total"] < padded_totals["prune/fwd_tokens_total"]


def test_a_padding_free_value_that_is_not_a_choice_is_one_clear_error(tiny_cfg):
    with pytest.raises(QTuningError, match="data.padding_free='yes' must be true, false or auto$"):
        train(tiny_cfg("data.padding_free=yes"))


@pytest.mark.slow  # a run of two processes
def test_two_processes_packed_train_as_one_padded_process(tmp_path):
    """One decision over both processes' rows (window scope, 2 × 4 rows), passes packed, against one process of 8 rows
    with padded passes: the same kept samples, logged losses and final weights."""
    from tests import test_window as window

    data = varied_pairs(tmp_path / "varied.jsonl", rows=48)  # 40 training rows: 5 windows of 8
    shared = [*window.BUDGETS["s50"], window.WINDOW, f"data.path={data}", "data.max_length=160"]
    padded = window.train_in_process(tmp_path / "padded", *shared, "data.batch_size=8", "data.padding_free=false")
    run_dir = tmp_path / "packed"
    args = tiny_cli_args(run_dir, *window.STEPS, *shared, "trainer=ddp_cpu", "data.batch_size=4",
                         "data.padding_free=true", *window.record(run_dir))  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    window.assert_same_steps(window.recorded(run_dir, world=2), padded)
