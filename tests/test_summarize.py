"""`qtuning.summarize`, the sweep summary: on hand-made job directories, and on a real two-job multirun of the tiny
model."""

from __future__ import annotations

import csv
import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra

from qtuning import summarize
from tests.conftest import TINY_OVERRIDES

BUDGETS = {"s25_t50": (0.25, 0.5), "s12_t70": (0.125, 0.7), "full": (1.0, 1.0)}


def make_job(
    sweep: Path, name: str, pruner: str, budget: str, val_loss: float | None, *extra: str, seed: int = 42
) -> Path:
    """A job directory as Hydra and qtuning.train leave it; ``pruner`` is ``NAME:SAMPLE:TOKEN`` (combo, or a preset
    built on it) or a plain name."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    choices = {"pruner": pruner.split(":")[0], "budget": budget, "model": "tiny_llama"}
    overrides = [f"pruner={choices['pruner']}", f"budget={budget}", "model=tiny_llama", *extra]
    if ":" in pruner:
        _, sample, token = pruner.split(":")
        choices |= {"pruner/sample": sample, "pruner/token": token}
        if pruner.startswith("combo:"):
            overrides += [f"pruner/sample={sample}", f"pruner/token={token}"]
    r_sample, r_token = BUDGETS[budget]
    config = {"seed": seed, "budget": {"r_sample": r_sample, "r_token": r_token}, "pruner": {"lam": 0.5}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if val_loss is not None:
        metrics = {"val/loss": val_loss, "val/ppl": 2 * val_loss, "trainer/global_step": 3, "runtime_s": 1.5}
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def table_lines(sweep: Path, metrics: list[str]) -> list[str]:
    return summarize.table(summarize.collect(sweep), metrics).splitlines()


def test_table_one_block_per_budget_with_deltas(tmp_path):
    make_job(tmp_path, "0", "combo:random:random", "s25_t50", 2.0)
    make_job(tmp_path, "1", "combo:random:ppl", "s25_t50", 1.9)
    make_job(tmp_path, "2", "qtuning", "s25_t50", 1.8)
    make_job(tmp_path, "3", "none", "s25_t50", 1.5)
    make_job(tmp_path, "4", "longest", "s25_t50", 2.1)
    make_job(tmp_path, "7", "random:random:none", "s25_t50", 2.2)  # the pruner=random preset
    make_job(tmp_path, "5", "combo:random:random", "s12_t70", 2.5)
    make_job(tmp_path, "6", "qtuning", "s12_t70", 2.2)
    lines = table_lines(tmp_path, ["val/loss"])
    start = lines.index("| Sample pruner | Token pruner | n | val/loss |")
    assert lines[start - 2] == "Same in every job: `model=tiny_llama`"
    assert lines[start + 1 : start + 14] == [
        "|---|---|---|---|",
        "| **12.5% samples × 70% tokens** | | | |",
        "| Random | Random | 1 | 2.500 (— / +1.000) |",
        "| Q-Tuning | — | 1 | 2.200 (−0.300 / +0.700) |",
        "| Full data | — | 1 | 1.500 (−1.000 / —) |",
        "| **25% samples × 50% tokens** | | | |",
        "| Random | Random | 1 | 2.000 (— / +0.500) |",
        "| Random | PPL | 1 | 1.900 (−0.100 / +0.400) |",
        "| Random | — | 1 | 2.200 (+0.200 / +0.700) |",
        "| Longest | — | 1 | 2.100 (+0.100 / +0.600) |",
        "| Q-Tuning | — | 1 | 1.800 (−0.200 / +0.300) |",
        "| Full data | — | 1 | 1.500 (−0.500 / —) |",
        "",
    ]
    legend = lines[start + 14]
    assert "difference to Random / Random of the same block and to Full data" in legend
    assert legend.endswith("Lower is better for losses and perplexities (val/loss).")
    assert not any("Missing" in line for line in lines)


def test_seeds_share_a_row_with_mean_std_and_n(tmp_path):
    for seed, loss in [(1, 1.0), (2, 2.0), (3, 3.0)]:
        make_job(tmp_path, f"q{seed}", "qtuning", "s25_t50", loss, f"seed={seed}", seed=seed)
    for seed, loss in [(1, 3.0), (2, 4.0)]:
        make_job(tmp_path, f"r{seed}", "combo:random:random", "s25_t50", loss, f"seed={seed}", seed=seed)
    # full data ignores the budget: seed 1 twice is one run, not two replicates
    for seed, budget, loss in [(1, "s25_t50", 1.5), (1, "s12_t70", 1.5), (2, "s25_t50", 2.5)]:
        make_job(tmp_path, f"f{seed}{budget}", "none", budget, loss, f"seed={seed}", seed=seed)
    lines = table_lines(tmp_path, ["val/loss", "val/ppl"])
    start = lines.index("| **25% samples × 50% tokens** | | | | |")
    assert lines[start + 1 : start + 5] == [
        "| Random | Random | 2 | 3.500 ± 0.707 (— / +1.500) | 7.000 ± 1.414 (— / +3.000) |",
        "| Q-Tuning | — | 3 | 2.000 ± 1.000 (−1.500 / +0.000) | 4.000 ± 2.000 (−3.000 / +0.000) |",
        "| Full data | — | 2 | 2.000 ± 0.707 (−1.500 / —) | 4.000 ± 1.414 (−3.000 / —) |",
        "",
    ]
    assert "Full data counts one job per seed, whatever its budget (which it ignores)." in lines[start + 5]


def test_pruner_overrides_split_rows_and_other_overrides_split_blocks(tmp_path):
    for i, (model, lam, loss) in enumerate([("a", "0.3", 1.0), ("a", "0.7", 1.2), ("b", "0.3", 2.0)]):
        make_job(tmp_path, f"q{i}", "qtuning", "s25_t50", loss, f"pruner.lam={lam}", f"data={model}")
    make_job(tmp_path, "ra", "combo:random:random", "s25_t50", 1.1, "data=a")
    make_job(tmp_path, "fb", "none", "full", 2.5, "data=b")
    lines = table_lines(tmp_path, ["val/loss"])
    start = lines.index("| **25% samples × 50% tokens · data=a** | | | |")
    assert lines[start + 1 : start + 6] == [
        "| Random | Random | 1 | 1.100 (— / —) |",
        "| Q-Tuning (pruner.lam=0.3) | — | 1 | 1.000 (−0.100 / —) |",
        "| Q-Tuning (pruner.lam=0.7) | — | 1 | 1.200 (+0.100 / —) |",
        "| **25% samples × 50% tokens · data=b** | | | |",
        "| Q-Tuning (pruner.lam=0.3) | — | 1 | 2.000 (— / −0.500) |",
    ]
    assert lines[start + 6] == "| Full data | — | 1 | 2.500 (— / —) |"


def test_missing_jobs_are_listed_and_kept_in_the_csv(tmp_path):
    make_job(tmp_path, "pruner=qtuning", "qtuning", "s25_t50", 1.0)
    make_job(tmp_path, "pruner=none", "none", "s25_t50", None)
    make_job(tmp_path, "pruner=combo", "combo:random:ppl", "s12_t70", None)
    lines = table_lines(tmp_path, ["val/loss"])
    at = lines.index("**Missing** (no metrics.json: crashed, killed or still running), 2 job(s):")
    assert lines[at + 1 :] == [
        "- `pruner=combo`: Random / PPL, 12.5% samples × 70% tokens",
        "- `pruner=none`: Full data / —",
    ]
    assert "| Q-Tuning | — | 1 | 1.000 (— / —) |" in lines


def test_cli_writes_csv_and_markdown(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_job(sweep, "a", "combo:random:ppl", "s25_t50", 1.0, "seed=1", seed=1)
    make_job(sweep, "b", "qtuning", "s25_t50", 2.0, "pruner.lam=0.3", "seed=2", seed=2)
    make_job(sweep, "c", "none", "s25_t50", None, "seed=3", seed=3)
    summarize.main([str(sweep), "--out", str(tmp_path / "out" / "t1")])
    markdown = (tmp_path / "out" / "t1.md").read_text()
    assert capsys.readouterr().out == markdown
    assert markdown.startswith(f"# Sweep {sweep}\n")
    assert "| Sample pruner | Token pruner | n | val/loss | val/ppl |" in markdown  # the default metrics
    with (tmp_path / "out" / "t1.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [
        *("job", "status", "pruner", "sample_pruner", "token_pruner", "budget", "r_sample", "r_token", "seed"),
        *("model", "pruner.lam"),
        *("runtime_s", "trainer/global_step", "val/loss", "val/ppl"),
    ]
    assert [(r["job"], r["status"], r["sample_pruner"], r["token_pruner"]) for r in rows] == [
        ("a", "done", "Random", "PPL"),
        ("b", "done", "Q-Tuning", "—"),
        ("c", "missing", "Full data", "—"),
    ]
    assert rows[1] == {
        **{"job": "b", "status": "done", "pruner": "qtuning", "sample_pruner": "Q-Tuning", "token_pruner": "—"},
        **{"budget": "s25_t50", "r_sample": "0.25", "r_token": "0.5", "seed": "2", "model": "tiny_llama"},
        **{"pruner.lam": "0.3", "runtime_s": "1.5", "trainer/global_step": "3", "val/loss": "2.0", "val/ppl": "4.0"},
    }
    assert rows[2]["val/loss"] == "" and rows[0]["pruner.lam"] == ""


def test_default_metrics_add_task_metrics():
    rows = [{"metrics": {"val/loss": 1.0, "arc_easy/acc": 0.5, "prune/kept_samples": 0.2, "runtime_s": 3.0}}]
    assert summarize.default_metrics(rows) == ["val/loss", "val/ppl", "arc_easy/acc"]


def test_token_totals_are_default_columns_in_whole_numbers(tmp_path):
    for job, fwd in (
        (make_job(tmp_path, "0", "combo:random:random", "s25_t50", 2.0), 217),
        (make_job(tmp_path, "1", "none", "s25_t50", 1.5), 48000),
    ):
        metrics = json.loads((job / "metrics.json").read_text())
        (job / "metrics.json").write_text(json.dumps({**metrics, "prune/fwd_tokens_total": fwd}))
    metrics = summarize.default_metrics(summarize.collect(tmp_path))
    assert metrics == ["val/loss", "val/ppl", "prune/fwd_tokens_total"]  # the other totals: no job has them
    lines = table_lines(tmp_path, metrics)
    assert "| Random | Random | 1 | 2.000 (— / +0.500) | 4.000 (— / +1.000) | 217 (— / −47,783) |" in lines
    assert "| Full data | — | 1 | 1.500 (−0.500 / —) | 3.000 (−1.000 / —) | 48,000 (+47,783 / —) |" in lines
    assert lines[-1].endswith("Lower is better for losses and perplexities (val/loss, val/ppl).")  # not for counts


@pytest.mark.parametrize("make", [False, True], ids=["no-such-dir", "empty-dir"])
def test_bad_sweep_dir_one_clear_line(tmp_path, capsys, make):
    sweep = tmp_path / "sweep"
    if make:
        sweep.mkdir()
        (sweep / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(SystemExit) as exit_info:
        summarize.main([str(sweep)])
    assert exit_info.value.code == 2
    reason = "no Hydra job found (no .hydra/hydra.yaml below it)" if make else "no such directory"
    assert capsys.readouterr().err == f"error: {sweep}: {reason}\n"


@pytest.mark.slow
def test_real_multirun_summarized(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    argv = ["qtuning.train", "-m", *TINY_OVERRIDES, "pruner=none,qtuning", "budget=s25_t50", "trainer.max_steps=2"]
    monkeypatch.setattr(sys, "argv", [*argv, "validate_before_fit=false", f"hydra.sweep.dir={sweep}"])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    GlobalHydra.instance().clear()
    try:
        runpy.run_module("qtuning.train", run_name="__main__")  # as `python -m qtuning.train`
    finally:  # Hydra configured logging for its jobs: give the root logger back to pytest
        GlobalHydra.instance().clear()
        for handler in set(root.handlers) - set(handlers):
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    capsys.readouterr()
    summarize.main([str(sweep), "--metrics", "val/loss"])
    lines = capsys.readouterr().out.splitlines()
    assert "| **25% samples × 50% tokens** | | | |" in lines
    assert sum(line.startswith("| Q-Tuning | — | 1 | ") for line in lines) == 1
    assert sum(line.startswith("| Full data | — | 1 | ") for line in lines) == 1
    assert not any("Missing" in line for line in lines)
    with (sweep / "summary.csv").open() as f:
        assert sorted((r["pruner"], r["status"], r["budget"]) for r in csv.DictReader(f)) == [
            ("none", "done", "s25_t50"),
            ("qtuning", "done", "s25_t50"),
        ]


def test_a_metric_some_jobs_lack_shows_its_own_count(tmp_path):
    make_job(tmp_path, "a", "qtuning", "s25_t50", 1.0, "seed=1", seed=1)
    make_job(tmp_path, "b", "qtuning", "s25_t50", 3.0, "seed=2", seed=2)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text()) | {"arc_easy/acc": 0.5}
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(metrics))
    lines = table_lines(tmp_path, ["val/loss", "arc_easy/acc"])
    assert "| Q-Tuning | — | 2 | 2.000 ± 1.414 (— / —) | 0.500 (n=1) (— / —) |" in lines


def test_method_names_the_row_and_splits_nothing(tmp_path):
    # sweep=table1 jobs carry method=<sample>_<token>: it differs between jobs but only names the pruner choices
    make_job(tmp_path, "0", "combo:random:random", "s25_t50", 2.0, "method=random_random")
    make_job(tmp_path, "1", "combo:infobatch:ppl", "s25_t50", 1.9, "method=infobatch_ppl")
    make_job(tmp_path, "2", "qtuning", "s25_t50", 1.8, "method=qtuning")
    lines = table_lines(tmp_path, ["val/loss"])
    start = lines.index("| **25% samples × 50% tokens** | | | |")
    assert lines[start + 1 : start + 4] == [
        "| Random | Random | 1 | 2.000 (— / —) |",
        "| InfoBatch | PPL | 1 | 1.900 (−0.100 / —) |",
        "| Q-Tuning | — | 1 | 1.800 (−0.200 / —) |",
    ]


def test_zero_shot_joins_every_block_and_single_jobs_show_lm_eval_standard_errors(tmp_path):
    for name, pruner, acc, stderr in [("r", "combo:random:random", 0.4, 0.03), ("q", "qtuning", 0.45, 0.025)]:
        job = make_job(tmp_path / "train", name, pruner, "s25_t50", 2.0, "trainer.max_epochs=3")
        (job / "metrics.json").write_text(json.dumps({"arc_easy/acc": acc, "arc_easy/acc_stderr": stderr}))
    zero_shot = tmp_path / "zero_shot"  # a `qtuning.eval` job: no pruner, no budget, none of the training overrides
    (zero_shot / ".hydra").mkdir(parents=True)
    choices = {"model": "smollm2_135m", "eval": "mini"}
    (zero_shot / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (zero_shot / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 42}))
    (zero_shot / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["eval=mini"]))
    (zero_shot / "metrics.json").write_text(json.dumps({"arc_easy/acc": 0.5, "arc_easy/acc_stderr": 0.02}))
    lines = table_lines(tmp_path, ["arc_easy/acc"])
    assert lines[0] == "Same in every job: `model=tiny_llama` `trainer.max_epochs=3`"
    start = lines.index("| **25% samples × 50% tokens** | | | |")
    assert lines[start + 1 : start + 4] == [
        "| Zero-shot (base) | — | 1 | 0.500 ± 0.020 (+0.100 / —) |",
        "| Random | Random | 1 | 0.400 ± 0.030 (— / —) |",
        "| Q-Tuning | — | 1 | 0.450 ± 0.025 (+0.050 / —) |",
    ]


def test_a_non_default_triage_names_its_own_row(tmp_path):
    make_job(tmp_path, "q", "qtuning", "s25_t50", 1.8, "method=qtuning")
    robust = make_job(tmp_path, "r", "qtuning", "s25_t50", 1.7, "method=qtuning_robust")
    config = yaml.safe_load((robust / ".hydra" / "config.yaml").read_text())
    config["pruner"] |= {"fill_up": "rank", "ppl_guard": 0.25}
    (robust / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    lines = table_lines(tmp_path, ["val/loss"])
    start = lines.index("| **25% samples × 50% tokens** | | | |")
    assert lines[start + 1 : start + 3] == [
        "| Q-Tuning | — | 1 | 1.800 (— / —) |",
        "| Q-Tuning (fill_up=rank, ppl_guard=0.25) | — | 1 | 1.700 (— / —) |",
    ]


def test_spread_is_std_over_seeds_or_the_single_jobs_stderr(tmp_path):
    jobs = [{"metrics": {"acc": v}} for v in (0.4, 0.5, 0.6)]
    mean, std, n = summarize.spread(jobs, "acc")
    assert (round(mean, 12), round(std, 12), n) == (0.5, 0.1, 3)  # sample std of .4 .5 .6 is .1
    assert summarize.spread([{"metrics": {"acc": 0.4, "acc_stderr": 0.03}}], "acc") == (0.4, 0.03, 1)
    assert summarize.spread([{"metrics": {"loss": 1.0}}], "loss") == (1.0, None, 1)
    assert summarize.spread([{"metrics": {}}], "acc") is None


def test_plot_puts_every_rows_mean_and_error_where_the_table_does(tmp_path):
    make_job(tmp_path, "r1", "combo:random:random", "s25_t50", 2.0, seed=1)
    make_job(tmp_path, "r2", "combo:random:random", "s25_t50", 2.4, seed=2)
    make_job(tmp_path, "q", "qtuning", "s25_t50", 1.8)
    make_job(tmp_path, "f", "none", "s25_t50", 1.5)
    make_job(tmp_path, "s", "combo:random:random", "s12_t70", 2.2)
    summarize.main([str(tmp_path), "--metrics", "val/loss", "val/ppl", "--plot", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s.png").stat().st_size > 0
    fig = summarize.plot(summarize.collect(tmp_path), ["val/loss"], tmp_path / "again.png")
    blocks = fig.axes
    assert [ax.get_title() for ax in blocks] == [
        "val/loss\n12.5% samples × 70% tokens",
        "val/loss\n25% samples × 50% tokens",
    ]
    ax = blocks[1]  # Random / Random, Q-Tuning, Full data: the table's order, drawn from the top
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Full data", "Q-Tuning", "Random / Random"]
    points = [line.get_xydata()[0].tolist() for line in ax.lines if line.get_marker() == "o"]
    assert points == [[1.5, 0.0], [1.8, 1.0], [pytest.approx(2.2), 2.0]]
    bars = ax.collections  # one horizontal error bar per row with an error: Random / Random's std
    assert len(bars) == 1
    ((start, end),) = [seg[:, 0] for seg in bars[0].get_segments()]
    assert (start, end) == (pytest.approx(2.2 - 0.282842712), pytest.approx(2.2 + 0.282842712))  # std(2.0, 2.4)
    dashed = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"]
    assert dashed == [1.5]  # full data


def test_spent_budget_is_each_rows_share_of_the_full_data_totals_marked_when_off_its_label(tmp_path):
    totals = {  # job: (pruner, response tokens learnt from, backward positions); full data: 1,000 and 4,000
        "f": ("none", 1000, 4000),
        "r": ("combo:random:random", 125, 1000),  # 0.125 and 0.25: on its label
        "i": ("combo:infobatch:random", 370, 2960),  # the original InfoBatch keeps far more than r_sample
        "q": ("qtuning", 130, 1080),  # +4% and +8%: within 10%
        "t": ("combo:infobatch_truncated:sparsevlm_inverted", 100, 800),  # −20% on both
    }
    for name, (pruner, response, bwd) in totals.items():
        job = make_job(tmp_path, name, pruner, "s25_t50", 2.0)
        metrics = {"val/loss": 2.0, "train/response_tokens_total": response, "prune/bwd_tokens_total": bwd}
        (job / "metrics.json").write_text(json.dumps(metrics))
    config = yaml.safe_load((tmp_path / "t" / ".hydra" / "config.yaml").read_text()) | {"lr_scale": 0.5}
    (tmp_path / "t" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))  # as method=*_authors sets it
    metrics = summarize.default_metrics(summarize.collect(tmp_path))
    assert metrics == ["val/loss", "val/ppl", "prune/bwd_tokens_total", "train/response_tokens_total"]
    lines = table_lines(tmp_path, ["val/loss", "train/response_tokens_total", "prune/bwd_tokens_total"])
    start = lines.index(
        "| Sample pruner | Token pruner | n | val/loss | train/response_tokens_total | prune/bwd_tokens_total "
        "| spent loss tokens | spent bwd tokens |"
    )
    spent = [line.split(" | ")[:2] + line.split(" | ")[-2:] for line in lines[start + 3 : start + 8]]
    assert spent == [
        ["| Random", "Random", "0.125", "0.250 |"],
        ["| InfoBatch", "Random", "0.370 ⚠ +196%", "0.740 ⚠ +196% |"],
        ["| InfoBatch (truncated) (lr_scale=0.5)", "SparseVLM (inverted)", "0.100 ⚠ −20%", "0.200 ⚠ −20% |"],
        ["| Q-Tuning", "—", "0.130", "0.270 |"],
        ["| Full data", "—", "1.000", "1.000 |"],
    ]
    assert "r_sample × r_token of the loss tokens (s25_t50: 0.125) and r_sample of the backward" in lines[-1]
    # a table of other metrics has no spent columns: they stand beside the totals they come from
    assert table_lines(tmp_path, ["val/loss"])[start] == "| Sample pruner | Token pruner | n | val/loss |"
