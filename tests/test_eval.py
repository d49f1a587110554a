"""`qtuning.eval`: lm-eval on a model in memory (against a plain reference), LoRA merged for it, and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtuning.errors import QTuningError
from qtuning.eval import call_groups, flatten_results, merged_for_eval
from qtuning.models import build_random_llama
from qtuning.models.build import apply_lora
from qtuning.train import train
from tests.conftest import FIXTURES, ROOT, run_cli_cases

EVAL_FIXTURES = FIXTURES / "eval"


def tiny_lora() -> torch.nn.Module:
    model = apply_lora(build_random_llama(vocab_size=104, seed=1), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0 (the adapter is the identity); make it matter
            torch.nn.init.normal_(param, std=0.5)
    return model


def test_merged_for_eval_gives_the_adapted_model_and_undoes_the_merge():
    model = tiny_lora().train()
    ids = torch.tensor([[5, 9, 13, 40, 41]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        base_weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
        with merged_for_eval(model, "cpu") as plain:
            assert not plain.training and not hasattr(plain, "merge_adapter")  # a plain causal LM, eval mode
            torch.testing.assert_close(plain(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
        assert model.training
        after = model.get_base_model().state_dict()
        assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in base_weights.items())
        torch.testing.assert_close(model(input_ids=ids).logits, adapted)


def test_flatten_results_names_metrics_by_task():
    results = {
        "qtuning_arc_easy": {"alias": "qtuning_arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "samples": 4},
        "qtuning_gsm8k": {"exact_match,flexible": 0.25, "exact_match_stderr,flexible": 0.05},
    }
    assert flatten_results(results, ["arc_easy", "gsm8k"]) == {
        "arc_easy/acc": 0.5,
        "arc_easy/acc_stderr": 0.1,
        "gsm8k/exact_match": 0.25,
        "gsm8k/exact_match_stderr": 0.05,
    }


def reference_accuracy(model: torch.nn.Module, tokenizer, path: Path) -> float:
    """ARC accuracy computed by hand: the choice whose " {text}" after "Question: ...\nAnswer:" has the highest
    summed log-likelihood, against the gold label."""
    correct = 0
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
        scores = []
        for text in doc["choices"]["text"]:
            ids = torch.tensor([tokenizer(context + " " + text, add_special_tokens=False).input_ids])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [T-1, V]
            targets = ids[0, 1:]
            scores.append(float(log_probs[n_context - 1 :].gather(1, targets[n_context - 1 :, None]).sum()))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["choices"]["label"].index(doc["answerKey"])
    return correct / len(docs)


def test_train_then_eval_writes_task_metrics_equal_to_a_reference(tiny_cfg, tmp_path):
    cfg = tiny_cfg("pruner=none", "trainer.max_steps=2", "eval=arc", f"eval.data_dir={EVAL_FIXTURES}")
    metrics, objects = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    model, tokenizer = objects["module"].model.eval(), objects["datamodule"].tokenizer
    for task in ("arc_easy", "arc_challenge"):
        expected = reference_accuracy(model, tokenizer, EVAL_FIXTURES / f"{task}.jsonl")
        assert written[f"{task}/acc"] == pytest.approx(expected)
        assert f"{task}/acc_stderr" in written and f"{task}/acc_norm" in written
    assert written["val/loss"] == pytest.approx(metrics["val/loss"])


def run_eval_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qtuning.eval", "model=tiny_llama", "logger=none", f"hydra.run.dir={tmp_path}"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_eval_cli_prints_accuracies_and_writes_metrics(tmp_path):
    result = run_eval_cli(tmp_path, "eval=arc", "eval.limit=2", f"eval.data_dir={EVAL_FIXTURES}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written) >= {"arc_easy/acc", "arc_challenge/acc", "eval/runtime_s"}
    assert 0.0 <= written["arc_easy/acc"] <= 1.0
    assert "arc_easy/acc" in result.stdout + result.stderr


@pytest.mark.slow
def test_eval_multirun_runs_every_job(tmp_path):
    """A multirun names its job directories through the short_dirname resolver, which the eval entry point must
    register too (it used to fail at once with UnsupportedInterpolationType)."""
    command = [sys.executable, "-m", "qtuning.eval", "-m", "model=tiny_llama", "logger=none", "eval=arc"]
    args = ["eval.limit=2,3", f"eval.data_dir={EVAL_FIXTURES}", f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {int(re.search(r"eval\.limit=(\d)", p.parent.name)[1]): p for p in tmp_path.glob("*/metrics.json")}
    assert sorted(jobs) == [2, 3]
    for limit, path in jobs.items():
        accuracy = json.loads(path.read_text())["arc_easy/acc"]
        assert (accuracy * limit) == pytest.approx(round(accuracy * limit))  # a count of correct documents of `limit`


EVAL_BAD_INPUT = {
    "unknown-task": (["eval.tasks=[arc_easy,mmlu]"], r"error: .*eval\.tasks.*mmlu"),
    "missing-dir": (["eval=arc", "eval.data_dir=/nonexistent"], r"error: eval\.data_dir=/nonexistent: not a directory"),
    "missing-checkpoint": (["checkpoint=/nonexistent/run"], r"error: checkpoint=/nonexistent/run"),
}


@pytest.mark.slow  # one start-up, each case forked from it (tests.cli_cases)
def test_eval_cli_bad_input_is_one_line(tmp_path):
    base = ["model=tiny_llama", "logger=none"]
    cases = [("qtuning.eval", [*base, f"hydra.run.dir={tmp_path / k}", *a]) for k, (a, _) in EVAL_BAD_INPUT.items()]
    for (case, (_, message)), result in zip(EVAL_BAD_INPUT.items(), run_cli_cases(cases), strict=True):
        assert result.returncode == 2, (case, result.stderr[-3000:])
        assert re.search(message, result.stderr) and "Traceback" not in result.stderr, (case, result.stderr[-3000:])


def test_train_rejects_unknown_eval_task_before_training(tiny_cfg):
    with pytest.raises(QTuningError, match="eval.tasks"):
        train(tiny_cfg("eval=arc", "eval.tasks=[nope]"))


def test_call_groups_by_limit_and_chat_template():
    names = ["arc_easy", "arc_challenge", "triviaqa", "squad2"]
    assert call_groups(names, None, {"triviaqa": 50, "squad2": 50}, ["triviaqa", "squad2"]) == {
        (None, False): ["arc_easy", "arc_challenge"],
        (50, True): ["triviaqa", "squad2"],
    }
    assert call_groups(names, 10, None, True) == {(10, True): names}
    assert call_groups(names, 10) == {(10, False): names}
    with pytest.raises(QTuningError, match=r"eval.chat_template names \['gsm8k'\]"):
        call_groups(names, 10, None, ["gsm8k"])
