"""The noisy-SFT experiment's runner and report (experiments/noisy_sft.py) on fabricated job outputs: which jobs run,
what the table says (by hand), the reached-the-loss fractions from the runs' records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import noisy_sft

KINDS = ["clean", "clean", "mismatched", "shuffled", "clean", "loop", "truncated", "clean"]  # 8 training rows


def write_data(out: Path) -> Path:
    data = out / "data"
    data.mkdir(parents=True)
    rows = [{"prompt": f"p{i}", "completion": f"r{i}", "kind": k} for i, k in enumerate(KINDS)]
    noisy_sft.write_jsonl(data / "train_noisy.jsonl", rows)
    noisy_sft.write_jsonl(data / "train_clean.jsonl", [{**r, "kind": "clean"} for r in rows])
    noisy_sft.write_jsonl(
        data / "heldout.jsonl", [{"prompt": "h0", "completion": "a0"}, {"prompt": "h1", "completion": "a1"}]
    )
    noisy_sft.write_jsonl(data / "matching.jsonl", [{"prompt": "h0", "own": "a0", "other": "a1"}])
    noisy_sft.write_jsonl(data / noisy_sft.HARD, [{"prompt": "h0", "own": "a0", "other": "a1"}])
    return data


def write_job(
    out: Path, row: str, seed: int, nll: float, acc: float, steps: list[list[int]], train_file: str,
    kept: list[list[int]] | None = None, hard: float = 0.5, r_sample: float = 0.25,
) -> None:  # fmt: skip
    job = out / "jobs" / row / f"seed{seed}"
    (job / ".hydra").mkdir(parents=True)
    heldout = {"heldout/nll": nll, "heldout/match_acc": acc, "heldout/match_hard_acc": hard, "heldout/runtime_s": 30.0}
    (job / "heldout.json").write_text(json.dumps(heldout))
    (job / ".hydra" / "config.yaml").write_text(f"budget:\n  r_sample: {r_sample}\n  r_token: 0.5\n")
    learnt = 100 * sum(map(len, steps)) + seed  # response tokens: 100 a sample reached, seed 2 one more
    metrics = {"runtime_s": 270.0, "trainer/global_step": len(steps), "train/response_tokens_total": learnt}
    (job / "metrics.json").write_text(json.dumps(metrics))
    locations = [f"{out / 'data' / train_file}:{line}" for line in range(1, 9)]
    entries = [[i, i // 2, s] + ([kept[i]] if kept else []) for i, s in enumerate(steps)]  # without kept: older
    record = {"locations": locations, "epochs": 2, "steps": entries}
    (job / "reached_loss.json").write_text(json.dumps(record))


EVERY = [[0, 1, 2, 3], [4, 5, 6, 7]] * 2  # 2 epochs of 2 steps, every sample each epoch


@pytest.fixture
def fabricated(tmp_path: Path) -> Path:
    write_data(tmp_path)
    for seed, (full, rr, robust) in {1: (2.1, 2.0, 1.9), 2: (2.5, 2.2, 2.0)}.items():
        write_job(tmp_path, "full_noisy", seed, full, 0.70, EVERY, "train_noisy.jsonl")
        write_job(tmp_path, "random_random", seed, rr, 0.60, [[0, 2], [5, 7]], "train_noisy.jsonl")
        # robust: clean rows 0, 1, 4, 7 reached 1+2+1+2 = 6 of 8 chances; only the loop row (5) of the noise, twice
        # and kept the mismatched row (2) in epoch 0 and the shuffled one (3) in epoch 1 with no response token left
        reached, kept = [[0, 1, 5], [4, 7], [1, 5], [7]], [[0, 1, 2, 5], [4, 7], [1, 3, 5], [7]]
        write_job(tmp_path, "qtuning_robust", seed, robust, 0.75, reached, "train_noisy.jsonl", kept, 0.4 + seed / 10)
    timed = [{"part": 1.0, "seconds": 1000.0}, {"part": 1.0, "seconds": 800.0}, {"part": 7.0, "seconds": 1200.0}]
    noisy_sft.write_jsonl(tmp_path / "runs.jsonl", timed)
    return tmp_path


def test_paired_differences_use_the_seeds_both_rows_have():
    assert noisy_sft.paired({1: 2.0, 2: 3.0, 3: 5.0}, {1: 1.0, 3: 1.0}) == (2.5, pytest.approx(2**0.5 * 1.5), 2)
    assert noisy_sft.paired({1: 2.0}, {1: 1.5}) == (0.5, None, 1)
    assert noisy_sft.paired({1: 2.0}, {2: 1.0}) is None


def test_report_table_by_hand(fabricated):
    results = noisy_sft.load_results(fabricated)
    lines = noisy_sft.table(results)
    robust = next(line for line in lines if line.startswith("| Q-Tuning (fill_up=rank"))
    # NLL 1.9, 2.0: 1.950 ± 0.071; vs Random / Random −0.1, −0.2: −0.150 ± 0.071; vs full −0.2, −0.5: −0.350 ± 0.212
    # matching accuracy 0.75 both seeds: vs Random / Random +0.15 ± 0; vs full +0.05 ± 0
    # hard negatives 0.5, 0.6: 0.550 ± 0.071; the others 0.5: +0.050 ± 0.071 against either
    assert robust == (
        "| Q-Tuning (fill_up=rank, ppl_guard=0.25) | 2 | 1.950 ± 0.071 | −0.150 ± 0.071 (n=2) | −0.350 ± 0.212 (n=2) "
        "| 0.750 ± 0.000 | +0.150 ± 0.000 (n=2) | +0.050 ± 0.000 (n=2) "
        "| 0.550 ± 0.071 | +0.050 ± 0.071 (n=2) | +0.050 ± 0.071 (n=2) |"
    )
    full = next(line for line in lines if line.startswith("| Full data, noisy set"))
    assert full.split(" | ")[2:5] == ["2.300 ± 0.283", "+0.200 ± 0.141 (n=2)", "—"]


def test_reached_fractions_per_kind_from_the_records(fabricated):
    sizes = {"clean": 4, "mismatched": 1, "shuffled": 1, "loop": 1, "truncated": 1}  # KINDS above
    lines = noisy_sft.reached_table(noisy_sft.load_results(fabricated), sizes)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    # columns: clean, mismatched, shuffled, loop, truncated, noise ÷ clean, noise share, tokens, steps, training s
    # share: 4 noisy of 8 rows; tokens 1,601.5 over itself
    full = ["1.000", "1.000", "1.000", "1.000", "1.000", "1.00", "0.50", "1.000", "4", "270 |"]
    assert rows["Full data, noisy set"] == full
    # Random / Random: clean 0 and 7 once each of 4 × 2 chances = 0.25; mismatched (2) 1/2; loop (5) 1/2;
    # share: 0.5 + 0.5 noisy sample-epochs of 0.25 · 4 + 1 in all
    # tokens: 401.5 of 1,601.5
    assert rows["Random / Random"][:8] == ["0.250", "0.500", "0.000", "0.500", "0.000", "1.00", "0.50", "0.251"]
    # robust: clean 6/8; loop 2/2; the rest 0: noise mean 0.25 over clean 0.75; share 1 of 0.75 · 4 + 1
    robust = ["0.750", "0.000", "0.000", "1.000", "0.000", "0.33", "0.25", "0.500"]  # tokens: 801.5 of 1,601.5
    assert rows["Q-Tuning (fill_up=rank, ppl_guard=0.25)"][:8] == robust


def test_kept_fractions_only_for_rows_whose_records_hold_the_kept_set(fabricated):
    results = noisy_sft.load_results(fabricated)
    sizes = {"clean": 4, "mismatched": 1, "shuffled": 1, "loop": 1, "truncated": 1}
    # robust kept: clean 6/8; mismatched 1/2; shuffled 1/2; loop 2/2; truncated 0; kept 0.75 · 4 + 0.5 + 0.5 + 1 = 5
    # sample-epochs per epoch, of which 4 reached the loss: 0.20 kept with no response token in it
    assert noisy_sft.kept_table(results, sizes)[2:] == [
        "| Q-Tuning (fill_up=rank, ppl_guard=0.25) | 0.750 | 0.500 | 0.500 | 1.000 | 0.000 | 0.20 |"
    ]  # the other rows' records are older, without the kept set
    assert noisy_sft.kept_section(results, sizes)[0] == "## What the sample decision kept"
    del results["qtuning_robust"]
    assert noisy_sft.kept_section(results, sizes) == []


def test_report_names_the_command_the_data_and_the_jobs_done(fabricated, tmp_path):
    doc = tmp_path / "docs" / "noisy_sft.md"
    doc.parent.mkdir()
    text = noisy_sft.report(fabricated, doc, "python -m experiments.noisy_sft run")
    command = "Command: `python -m experiments.noisy_sft run` — 50 min of wall time in 2 part(s)"
    assert command in text  # 1,000 + 800 + 1,200 s in two parts
    assert "6 of 43 jobs done" in text
    assert (
        "8 real single-turn ShareGPT pairs for training, 4 clean, 1 mismatched, 1 shuffled, 1 loop, 1 truncated" in text
    )
    assert (doc.parent / "noisy_sft.png").stat().st_size > 0


def test_a_missing_kind_names_the_file_and_line(tmp_path):
    data = write_data(tmp_path)
    with pytest.raises(noisy_sft.QTuningError, match=r"train_noisy.jsonl:9: no such row"):
        noisy_sft.job_kinds(f"{data / 'train_noisy.jsonl'}:9", {})
    (data / "bad.jsonl").write_text('{"prompt": "p"}\n')
    with pytest.raises(noisy_sft.QTuningError, match=r"bad.jsonl:1: missing field 'kind'"):
        noisy_sft.job_kinds(f"{data / 'bad.jsonl'}:1", {})


def test_run_skips_done_jobs_and_scores_trained_ones_without_retraining(tmp_path, monkeypatch):
    write_data(tmp_path)
    done = tmp_path / "jobs" / "qtuning" / "seed1"
    done.mkdir(parents=True)
    scored = {metric: 1.0 for metric, _ in noisy_sft.METRICS}
    (done / "heldout.json").write_text(json.dumps(scored))
    trained = tmp_path / "jobs" / "qtuning" / "seed2"
    trained.mkdir(parents=True)
    (trained / "metrics.json").write_text("{}")
    stale = tmp_path / "jobs" / "random_random" / "seed1"  # scored before the hard negatives: scored again
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text("{}")
    (stale / "heldout.json").write_text(json.dumps({"heldout/nll": 3.0, "heldout/match_acc": 0.5}))
    calls = []
    monkeypatch.setattr(
        noisy_sft.subprocess, "run", lambda cmd, cwd: calls.append(cmd) or type("R", (), {"returncode": 0})
    )
    monkeypatch.setattr(noisy_sft, "score", lambda job, data: {"heldout/nll": float(job.seed)})
    noisy_sft.run(tmp_path, ["base", "qtuning", "full_clean", "random_random"], [1, 2], ["trainer.max_steps=2"])
    trained_dirs = [next(a for a in cmd if a.startswith("hydra.run.dir=")) for cmd in calls]
    assert trained_dirs == [f"hydra.run.dir={tmp_path}/jobs/{row}/seed{s}" for row, s in
                            [("full_clean", 1), ("full_clean", 2), ("random_random", 2)]]  # fmt: skip
    assert f"data.path={tmp_path}/data/train_clean.jsonl" in calls[0] and "resume=auto" in calls[0]
    assert calls[0][-1] == "trainer.max_steps=2"
    assert json.loads((trained / "heldout.json").read_text()) == {"heldout/nll": 2.0}  # scored, not trained again
    assert json.loads((stale / "heldout.json").read_text()) == {"heldout/nll": 1.0}
    assert (tmp_path / "jobs" / "base" / "heldout.json").exists()
    assert json.loads((done / "heldout.json").read_text()) == scored
    timed = noisy_sft.read_jsonl(tmp_path / "runs.jsonl", ["part", "job", "seconds"])
    assert [entry["job"] for entry in timed] == ["jobs/base", "jobs/qtuning/seed2", "jobs/full_clean/seed1",
                                                 "jobs/full_clean/seed2", "jobs/random_random/seed1",
                                                 "jobs/random_random/seed2"]  # fmt: skip
    assert len({entry["part"] for entry in timed}) == 1


def test_cut_to_fit_drops_the_last_words_until_the_pair_fits():
    fit = noisy_sft.cut_to_fit(lambda prompt, response: len(prompt) + len(response), max_length=12)
    assert fit("abcd", "one two three") == "one two"  # 4 + 7 ≤ 12
    assert fit("abcdefghijklmn", "one two") == "one"  # never empty


def test_the_report_command_writes_the_doc_and_its_plot(fabricated, tmp_path, capsys):
    doc = tmp_path / "out" / "noisy_sft.md"
    noisy_sft.main(["--out", str(fabricated), "report", "--write", str(doc), "--command", "python -m x run"])
    text = doc.read_text()
    assert text.startswith("# Does Q-Tuning protect fine-tuning from bad data?")
    assert "Command: `python -m x run`" in text and "## Sizing" in text and "## Reading" in text
    assert (doc.parent / "noisy_sft.png").exists() and text in capsys.readouterr().out


def test_a_rerun_of_the_report_keeps_the_hand_written_reading(fabricated, tmp_path):
    doc = tmp_path / "noisy_sft.md"
    first = noisy_sft.report(fabricated, doc, "python -m x run")
    assert first.endswith(f"## Reading\n\n{noisy_sft.READING_TO_WRITE}\n")
    reading = "Q-Tuning kept the noise out.\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    doc.write_text(first.replace(noisy_sft.READING_TO_WRITE, reading))
    again = noisy_sft.report(fabricated, doc, "python -m y run")
    assert again.endswith(f"## Reading\n\n{reading}\n") and "Command: `python -m y run`" in again


def test_all_builds_only_missing_data_then_runs_and_reports(fabricated, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(noisy_sft, "build", lambda *args: calls.append(("build", *args)))
    monkeypatch.setattr(noisy_sft, "run", lambda out, rows, seeds, extra: calls.append(("run", rows, seeds)))
    doc = tmp_path / "doc" / "noisy_sft.md"
    noisy_sft.main(["--out", str(fabricated), "all", "--write", str(doc)])
    assert calls == [("run", ["base", *noisy_sft.ROWS], [1, 2, 3])]  # the data is there: not rebuilt
    assert "Command: `python -m experiments.noisy_sft all` — 50 min" in doc.read_text()
    calls.clear()
    empty = tmp_path / "empty"
    with pytest.raises(SystemExit):  # the stubs train nothing, so there is nothing to report
        noisy_sft.main(["--out", str(empty), "all", "--seeds", "2", "--write", str(doc)])
    assert "empty: no finished job" in capsys.readouterr().err
    assert calls == [("build", empty, 176, 64, 0.3, 0), ("run", ["base", *noisy_sft.ROWS], [2])]


def write_every_qtuning_row(out: Path) -> None:
    """Every Q-Tuning row and full data (noisy) for seeds 1-3. Each row's NLL is 2.0 less 0.01 per row, but the
    per-sample row at s50_t70 is best (1.5, 1.6, 1.7 over the seeds); response tokens: 100 a sample-step (+ seed)."""
    for seed in noisy_sft.SEEDS:
        write_job(out, "full_noisy", seed, 2.3, 0.7, EVERY, "train_noisy.jsonl")  # 1,600 + seed tokens
        for i, row in enumerate(noisy_sft.QTUNING_ROWS):
            best = row == "qtuning_per_sample_s50"
            nll = 1.4 + seed / 10 if best else 2.0 - i / 100
            write_job(out, row, seed, nll, 0.7, [[0, 1], [2], [4, 5], [7]], "train_noisy.jsonl", r_sample=0.5)


def test_the_token_matched_budget_follows_the_best_qtuning_row(tmp_path):
    data = write_data(tmp_path)
    write_every_qtuning_row(tmp_path)
    # best: qtuning_per_sample_s50 (NLL 1.6 on average); it spent (600 + 2) / (1,600 + 2) = 0.37578 of the tokens
    matched = noisy_sft.matched_budget(tmp_path)
    assert matched["row"] == "qtuning_per_sample_s50" and matched["r_sample"] == 0.5
    assert matched["share"] == pytest.approx(602 / 1602) and matched["r_token"] == pytest.approx(2 * 602 / 1602)
    assert json.loads((tmp_path / "matched_budget.json").read_text()) == matched  # chosen once, then read back
    job = noisy_sft.Job(noisy_sft.MATCHED, 2, tmp_path / "jobs" / noisy_sft.MATCHED / "seed2")
    command = noisy_sft.train_command(job, data, [])
    assert "budget.r_sample=0.5" in command and "budget.r_token=0.7516" in command
    assert "pruner/sample=random" in command and "pruner/token=random" in command


def test_the_token_matched_control_waits_for_every_qtuning_job(tmp_path):
    data = write_data(tmp_path)
    write_every_qtuning_row(tmp_path)
    (tmp_path / "jobs" / "qtuning_robust_window" / "seed3" / "heldout.json").unlink()
    job = noisy_sft.Job(noisy_sft.MATCHED, 1, tmp_path / "jobs" / noisy_sft.MATCHED / "seed1")
    with pytest.raises(noisy_sft.QTuningError, match=r"jobs/qtuning_robust_window/seed3 is not \(1 job\(s\) left\)"):
        noisy_sft.train_command(job, data, [])
    assert not (tmp_path / "matched_budget.json").exists()


def test_the_equal_tokens_section_by_hand(tmp_path):
    write_data(tmp_path)
    write_every_qtuning_row(tmp_path)
    for seed in noisy_sft.SEEDS:  # the control: NLL 1.6 + seed / 10, 0.5 hard accuracy; 2 samples a step
        write_job(
            tmp_path, noisy_sft.MATCHED, seed, 1.6 + seed / 10, 0.6, [[0, 1], [2, 3], [4, 5]], "train_noisy.jsonl"
        )
    lines = noisy_sft.matched_section(noisy_sft.load_results(tmp_path), tmp_path)
    assert lines[0] == "## At equal response tokens"
    # best 1.5, 1.6, 1.7 against 1.7, 1.8, 1.9: −0.2 every seed; matching 0.7 against 0.6: +0.1
    assert (
        lines[4]
        == "| Q-Tuning, per-sample token budget, s50_t70 | 0.376 | 1.600 ± 0.100 | 0.700 ± 0.000 | 0.500 ± 0.000 |"
    )
    assert lines[5].startswith("| Random / Random at the best Q-Tuning row's response tokens | 0.376 | 1.800 ± 0.100")
    assert lines[6] == "| Δ (same seed) |  | −0.200 ± 0.000 (n=3) | +0.100 ± 0.000 (n=3) | +0.000 ± 0.000 (n=3) |"
    assert "r_sample 0.5, r_token 0.7516 (= 0.376 / 0.5)" in lines[8]


def test_hard_matching_takes_the_response_of_the_nearest_prompt(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    heldout = [("how to bake bread at home", "Knead."), ("what is a prime number", "A number with two divisors."),
               ("bake a cake at home quickly", "Mix."), ("list prime numbers below ten", "2, 3, 5, 7.")]  # fmt: skip
    noisy_sft.write_jsonl(data / "heldout.jsonl", [{"prompt": p, "completion": c} for p, c in heldout])
    noisy_sft.write_hard_matching(data, lambda prompt, response: response.upper())
    triples = noisy_sft.read_jsonl(data / noisy_sft.HARD, ["prompt", "own", "other"])
    assert [(t["own"], t["other"]) for t in triples] == [
        ("Knead.", "MIX."), ("A number with two divisors.", "2, 3, 5, 7."), ("Mix.", "KNEAD."),
        ("2, 3, 5, 7.", "A NUMBER WITH TWO DIVISORS."),
    ]  # fmt: skip
