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
    return data


def write_job(
    out: Path, row: str, seed: int, nll: float, acc: float, steps: list[list[int]], train_file: str,
    kept: list[list[int]] | None = None,
) -> None:  # fmt: skip
    job = out / "jobs" / row / f"seed{seed}"
    job.mkdir(parents=True)
    heldout = {"heldout/nll": nll, "heldout/match_acc": acc, "heldout/runtime_s": 30.0}
    (job / "heldout.json").write_text(json.dumps(heldout))
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
        write_job(tmp_path, "qtuning_robust", seed, robust, 0.75, reached, "train_noisy.jsonl", kept)
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
    assert robust == (
        "| Q-Tuning (fill_up=rank, ppl_guard=0.25) | 2 | 1.950 ± 0.071 | −0.150 ± 0.071 (n=2) | −0.350 ± 0.212 (n=2) "
        "| 0.750 ± 0.000 | +0.150 ± 0.000 (n=2) | +0.050 ± 0.000 (n=2) |"
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
    assert "6 of 22 jobs done" in text
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
    (done / "heldout.json").write_text("{}")
    trained = tmp_path / "jobs" / "qtuning" / "seed2"
    trained.mkdir(parents=True)
    (trained / "metrics.json").write_text("{}")
    calls = []
    monkeypatch.setattr(
        noisy_sft.subprocess, "run", lambda cmd, cwd: calls.append(cmd) or type("R", (), {"returncode": 0})
    )
    monkeypatch.setattr(noisy_sft, "score", lambda job, data: {"heldout/nll": float(job.seed)})
    noisy_sft.run(tmp_path, ["base", "qtuning", "full_clean"], [1, 2], ["trainer.max_steps=2"])
    trained_dirs = [next(a for a in cmd if a.startswith("hydra.run.dir=")) for cmd in calls]
    assert trained_dirs == [f"hydra.run.dir={tmp_path}/jobs/full_clean/seed{s}" for s in (1, 2)]  # not qtuning
    assert f"data.path={tmp_path}/data/train_clean.jsonl" in calls[0] and "resume=auto" in calls[0]
    assert calls[0][-1] == "trainer.max_steps=2"
    assert json.loads((trained / "heldout.json").read_text()) == {"heldout/nll": 2.0}  # scored, not trained again
    assert (tmp_path / "jobs" / "base" / "heldout.json").exists() and (done / "heldout.json").read_text() == "{}"
    timed = noisy_sft.read_jsonl(tmp_path / "runs.jsonl", ["part", "job", "seconds"])
    assert [entry["job"] for entry in timed] == ["jobs/base", "jobs/qtuning/seed2", "jobs/full_clean/seed1",
                                                 "jobs/full_clean/seed2"]  # fmt: skip
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
