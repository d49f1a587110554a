"""Does Q-Tuning protect fine-tuning from bad data? A controlled noisy-SFT experiment with known noise (issue 17).

    python -m experiments.noisy_sft all                        # the whole experiment: build (unless built), run, report
    python -m experiments.noisy_sft build                      # the data: logs/noisy_sft/data/
    python -m experiments.noisy_sft run                        # every job not yet finished (resumable, in parts)
    python -m experiments.noisy_sft run --rows qtuning --seeds 1   # a part
    python -m experiments.noisy_sft report --write docs/results/noisy_sft.md

1. ``build``: real single-turn ShareGPT pairs that fit 128 tokens under SmolLM2's chat template, split (seeded) into
   ``--n-train`` training and ``--n-heldout`` held-out pairs; 30 % of the training rows corrupted in equal shares
   (mismatched: another corrupted row's response; shuffled words; a loop of the first sentence; truncated to 40 % of
   the words; `experiments.corrupt`), each row's ``kind`` recorded in ``train_noisy.jsonl``. ``train_clean.jsonl``
   is the same rows with their own responses (the reference), ``heldout.jsonl`` the clean held-out pairs and
   ``matching.jsonl`` a (prompt, own, other) triple per held-out pair (other: the next held-out pair's response),
   ``matching_hard.jsonl`` the same with a hard negative (other: the response of the held-out pair whose prompt is
   nearest by TF-IDF cosine).
2. ``run``: for every row × seed (the training order: data shuffle, LoRA init, the random pruners' draws), one
   ``python -m qtuning.train experiment=noisy_sft ... resume=auto`` in ``<out>/jobs/<row>/seed<k>``, then the
   held-out metrics of its adapter (`experiments.heldout`) into ``heldout.json``. A job with ``heldout.json`` is done
   and skipped; a killed one resumes from its last checkpoint; a trained one scored before a metric was added is
   scored again. Row ``base`` scores the untrained model once; row ``random_matched`` runs last, at the response
   tokens the best Q-Tuning row spent (`matched_budget`).
3. ``report``: mean ± std over seeds, paired differences (same seed) against Random / Random and full data on the
   noisy set, the fraction of each kind that reached the loss (`qtuning.reached`, from each run's own decisions), a
   plot, and the jobs' wall time.

Sizing: `noisy_sft_sizing.md` beside this file, which the report repeats. The defaults (``--n-train 176
--n-heldout 64``, 3 epochs in conf/experiment/noisy_sft.yaml) are sized for the 22 jobs to take at most about
1 h 50 min on this 2-core CPU when it is quiet (they took 80 min); ``python -m experiments.noisy_sft time`` measures
the step times of the row shapes that set the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.corrupt import NOISE_KINDS, noisy_split, single_turn_pairs
from qtuning.errors import QTuningError, exit_on_bad_input
from qtuning.reached import reach_counts, reached_fractions
from qtuning.summarize import stats

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "logs" / "noisy_sft"
MAX_LENGTH = 128
SEEDS = (1, 2, 3)
KINDS = ("clean", *NOISE_KINDS)


@dataclass(frozen=True)
class Row:
    name: str  # in the report
    overrides: tuple[str, ...]  # of its training jobs
    reference: str = "random_random"  # the Random / Random row at the same budget, for the paired differences


RANDOM = ("pruner=combo", "pruner/sample=random", "pruner/token=random")
INFOBATCH = ("pruner=combo", "pruner/sample=infobatch", "pruner/token=random")
PER_SAMPLE = "pruner.token_budget=per_sample"  # each kept Q2 sample keeps ceil(r_token · n) of its tokens
S50 = "budget=s50_t70"
MATCHED = "random_matched"  # Random / Random at the best Q-Tuning row's spent response tokens (`matched_budget`)
# `full_clean` trains on train_clean.jsonl; every row at s25_t50 (conf/experiment/noisy_sft.yaml) unless it says
ROWS: dict[str, Row] = {
    "full_clean": Row("Full data, clean set (reference)", ("pruner=none",)),
    "full_noisy": Row("Full data, noisy set", ("pruner=none",)),
    "random_random": Row("Random / Random", RANDOM),
    "qtuning": Row("Q-Tuning (authors' triage)", ("pruner=qtuning",)),
    "qtuning_robust": Row("Q-Tuning (fill_up=rank, ppl_guard=0.25)", ("pruner=qtuning_robust",)),
    "infobatch_random": Row("InfoBatch / Random", INFOBATCH),
    # one decision per optimizer step over 4 micro-batches of 8 (32 rows, 8 kept): a quarter of the steps at 4× the
    # batch, so it differs from the row above in the decision's population and in the step count
    "qtuning_robust_window": Row(
        "Q-Tuning robust, window scope (8 × 4)",
        ("pruner=qtuning_robust", "pruner.threshold_scope=window", "trainer.accumulate_grad_batches=4"),
    ),
    "qtuning_per_sample": Row("Q-Tuning, per-sample token budget", ("pruner=qtuning", PER_SAMPLE)),
    "qtuning_robust_per_sample": Row("Q-Tuning robust, per-sample token budget", ("pruner=qtuning_robust", PER_SAMPLE)),
    "random_random_s50": Row("Random / Random, s50_t70", (*RANDOM, S50), reference="random_random_s50"),
    "infobatch_random_s50": Row("InfoBatch / Random, s50_t70", (*INFOBATCH, S50), reference="random_random_s50"),
    "qtuning_per_sample_s50": Row(
        "Q-Tuning, per-sample token budget, s50_t70", ("pruner=qtuning", PER_SAMPLE, S50), reference="random_random_s50"
    ),
    "qtuning_robust_per_sample_s50": Row(
        "Q-Tuning robust, per-sample token budget, s50_t70",
        ("pruner=qtuning_robust", PER_SAMPLE, S50),
        reference="random_random_s50",
    ),
    # last: its budget comes from the rows above (`matched_budget`)
    MATCHED: Row("Random / Random at the best Q-Tuning row's response tokens", RANDOM, reference=MATCHED),
}
QTUNING_ROWS = tuple(row for row in ROWS if row.startswith("qtuning"))
BASE = "base"  # the untrained model, scored once: where training started
SIZING = Path(__file__).with_name("noisy_sft_sizing.md")  # what the defaults are sized from (the report repeats it)

FILES = ("train_noisy.jsonl", "train_clean.jsonl", "heldout.jsonl", "matching.jsonl")
HARD = "matching_hard.jsonl"  # derived from heldout.jsonl (`write_hard_matching`), also for data built before it


# ---- build ---------------------------------------------------------------------------------------------------------


def chat_length(tokenizer: Any) -> Any:
    """(prompt, response) -> tokens of the pair under the tokenizer's chat template, as training encodes it."""
    from qtuning.data import encode_conversation

    def length(prompt: str, response: str) -> int:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return len(encode_conversation(tokenizer, messages, max_length=10**6).input_ids)

    return length


def cut_to_fit(length: Any, max_length: int) -> Any:
    """A `experiments.corrupt.Fit`: the response's last words dropped until the pair fits ``max_length`` tokens."""

    def fit(prompt: str, response: str) -> str:
        words = response.split(" ")
        while len(words) > 1 and length(prompt, " ".join(words)) > max_length:
            words.pop()
        return " ".join(words)

    return fit


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build(out: Path, n_train: int, n_heldout: int, noise: float, seed: int) -> None:
    length = chat_length(tokenizer())
    pairs = []
    for prompt, response in single_turn_pairs(max_prompt_chars=400, max_response_chars=600):
        if length(prompt, response) <= MAX_LENGTH:
            pairs.append((prompt, response))
        if len(pairs) == n_train + n_heldout:
            break
    fit = cut_to_fit(length, MAX_LENGTH)
    split = noisy_split(pairs, n_train, n_heldout, noise, seed, fit=fit)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(FILES, (split.train, split.clean, split.heldout, split.matching), strict=True):
        write_jsonl(data / name, rows)
    write_hard_matching(data, fit)
    kinds = [row["kind"] for row in split.train]
    print(f"wrote {data}: {n_train} training rows ({', '.join(f'{kinds.count(k)} {k}' for k in KINDS)}), "
          f"{n_heldout} held-out pairs and as many matching triples")  # fmt: skip


def write_hard_matching(data: Path, fit: Any) -> None:
    """``matching_hard.jsonl``: per held-out pair, (prompt, own, other) with ``other`` the response of the held-out
    pair whose prompt is most like this one (`experiments.heldout.nearest_prompts`), cut to fit as in ``build``."""
    from experiments.heldout import nearest_prompts

    heldout = read_jsonl(data / "heldout.jsonl", ["prompt", "completion"])
    nearest = nearest_prompts([row["prompt"] for row in heldout])
    triples = [
        {"prompt": row["prompt"], "own": row["completion"], "other": fit(row["prompt"], heldout[j]["completion"])}
        for row, j in zip(heldout, nearest, strict=True)
    ]
    write_jsonl(data / HARD, triples)


def tokenizer() -> Any:
    from qtuning.models import build_tokenizer

    return build_tokenizer(model_config(), cache_dir())


def model_config() -> Any:
    from hydra import compose, initialize_config_dir

    from qtuning.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=["experiment=noisy_sft"]).model


def cache_dir() -> str:
    return os.environ.get("QTUNING_CACHE_DIR", "~/.cache/qtuning")


def read_jsonl(path: Path, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a JSONL file, each checked for ``keys``; the error names the file, line and key."""
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise QTuningError(f"{path}:{line_no}: malformed JSON: {err.msg}") from None
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise QTuningError(f"{path}:{line_no}: missing field '{missing[0]}'")
        rows.append(row)
    return rows


# ---- run -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    row: str
    seed: int
    dir: Path

    @property
    def done(self) -> bool:
        """Scored with every metric: a job scored before a metric was added is scored again (not retrained)."""
        path = self.dir / "heldout.json"
        return path.exists() and all(metric in json.loads(path.read_text()) for metric, _ in METRICS)


def jobs(out: Path, rows: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Every (row, seed) job in ``rows`` order, seeds inner; the base model once, first."""
    listed = [Job(BASE, 0, out / "jobs" / BASE)] if BASE in rows else []
    return listed + [Job(r, s, out / "jobs" / r / f"seed{s}") for r in rows if r != BASE for s in seeds]


def train_command(job: Job, data: Path, extra: Sequence[str], resume: bool = True) -> list[str]:
    train_file = data / ("train_clean.jsonl" if job.row == "full_clean" else "train_noisy.jsonl")
    budget = []
    if job.row == MATCHED:
        matched = matched_budget(data.parent)
        budget = [f"budget.r_sample={matched['r_sample']}", f"budget.r_token={matched['r_token']:.4f}"]
    return [
        sys.executable, "-m", "qtuning.train", "experiment=noisy_sft", *ROWS[job.row].overrides, *budget,
        f"seed={job.seed}", f"data.path={train_file}", f"hydra.run.dir={job.dir}", *(["resume=auto"] if resume else []),
        *extra,
    ]  # fmt: skip


def matched_budget(out: Path) -> dict[str, Any]:
    """The token-matched control's budget, chosen once (``<out>/matched_budget.json``) when every Q-Tuning row and
    full data (noisy) is done for every seed: the Q-Tuning row with the lowest mean held-out NLL, the share of full
    data's response tokens it spent (the reached table's column), and Random / Random at that row's r_sample with
    r_token = share / r_sample, which spends as much."""
    from omegaconf import OmegaConf

    path = out / "matched_budget.json"
    if path.exists():
        return json.loads(path.read_text())
    missing = [job for job in jobs(out, [*QTUNING_ROWS, "full_noisy"], SEEDS) if not job.done]
    if missing:
        raise QTuningError(
            f"{MATCHED} needs every Q-Tuning row and full data (noisy) done first: "
            f"{missing[0].dir.relative_to(out)} is not ({len(missing)} job(s) left)"
        )
    results = load_results(out)
    mean_nll = {row: statistics.fmean(by_seed(results, row, "heldout/nll").values()) for row in QTUNING_ROWS}
    best = min(QTUNING_ROWS, key=mean_nll.__getitem__)
    share = spent_share(results, best)
    assert share is not None  # full_noisy is done
    r_sample = float(OmegaConf.load(out / "jobs" / best / f"seed{SEEDS[0]}" / ".hydra" / "config.yaml").budget.r_sample)
    if share > r_sample:
        raise QTuningError(f"{best} spent {share:.3f} of full data's response tokens, over its r_sample {r_sample}")
    matched = {
        "row": best,
        "heldout/nll": mean_nll[best],
        "share": share,
        "r_sample": r_sample,
        "r_token": share / r_sample,
    }
    path.write_text(json.dumps(matched, indent=2) + "\n")
    return matched


def score(job: Job, data: Path) -> dict[str, float]:
    """The held-out metrics of the job's adapter (the base model for ``base``), with the scoring time."""
    from omegaconf import OmegaConf

    from experiments.heldout import heldout_metrics
    from qtuning.eval import load_for_eval

    started = time.time()
    trained = job.row != BASE
    model_cfg = OmegaConf.load(job.dir / ".hydra" / "config.yaml").model if trained else model_config()
    cfg = OmegaConf.create(
        {
            "model": model_cfg,
            "paths": {"cache_dir": cache_dir()},
            "seed": 0,
            "checkpoint": str(job.dir) if trained else None,
        }
    )
    model, tokenizer = load_for_eval(cfg)
    heldout = [(r["prompt"], r["completion"]) for r in read_jsonl(data / "heldout.jsonl", ["prompt", "completion"])]
    matching, hard = (
        [(r["prompt"], r["own"], r["other"]) for r in read_jsonl(data / name, ["prompt", "own", "other"])]
        for name in ("matching.jsonl", HARD)
    )
    metrics = heldout_metrics(model, tokenizer, heldout, matching, hard, MAX_LENGTH)
    return {**metrics, "heldout/runtime_s": time.time() - started}


def run(out: Path, rows: Sequence[str], seeds: Sequence[int], extra: Sequence[str]) -> None:
    data = out / "data"
    missing = [name for name in FILES if not (data / name).exists()]
    if missing:
        raise QTuningError(f"{data}: no {missing[0]}; run `python -m experiments.noisy_sft build` first")
    if not (data / HARD).exists():  # data built before the hard negatives: the same triples `build` writes now
        write_hard_matching(data, cut_to_fit(chat_length(tokenizer()), MAX_LENGTH))
    todo = [job for job in jobs(out, rows, seeds) if not job.done]
    print(f"{len(todo)} job(s) to run" + "".join(f"\n  {job.dir.relative_to(out)}" for job in todo), flush=True)
    part = time.time()
    for job in todo:
        started = time.time()
        job.dir.mkdir(parents=True, exist_ok=True)
        if job.row != BASE and not (job.dir / "metrics.json").exists():
            result = subprocess.run(train_command(job, data, extra), cwd=ROOT)
            if result.returncode != 0:
                raise QTuningError(f"{job.dir}: training failed (exit {result.returncode}); see its train.log")
        metrics = score(job, data)
        (job.dir / "heldout.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"{job.dir.relative_to(out)}: {metrics}", flush=True)
        with (out / "runs.jsonl").open("a") as f:  # each job's wall time, for the report (a killed part keeps its own)
            entry = {"part": part, "job": str(job.dir.relative_to(out)), "seconds": time.time() - started}
            f.write(json.dumps(entry) + "\n")


# ---- report --------------------------------------------------------------------------------------------------------


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float | None, int] | None:
    """Mean and sample std of ``a[s] − b[s]`` over the seeds both have, and their number; None if none."""
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    return (*stats([a[s] - b[s] for s in seeds]), len(seeds))


def fmt(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:{'+' if sign else ''}.{digits}f}".replace("-", "−")


def fmt_spread(mean: float, std: float | None, n: int | None = None, sign: bool = False) -> str:
    text = fmt(mean, sign=sign) + ("" if std is None else f" ± {fmt(std)}")
    return text + (f" (n={n})" if n is not None else "")


def job_kinds(location: str, cache: dict[str, dict[int, str]]) -> str:
    """The ``kind`` of a training sample, from its ``file:line`` location."""
    path, _, line = location.rpartition(":")
    if path not in cache:
        rows = read_jsonl(Path(path), ["kind"])
        cache[path] = {i: row["kind"] for i, row in enumerate(rows, start=1)}
    if int(line) not in cache[path]:
        raise QTuningError(f"{location}: no such row in {path}")
    return cache[path][int(line)]


REACHED, KEPT = 2, 3  # the columns of a reached_loss.json step: [step, epoch, reached, kept]


def kind_fractions(record: dict[str, Any], column: int, kinds: Sequence[str]) -> dict[str, float]:
    """Per kind, the share of its (sample, epoch) chances in a column of a ``reached_loss.json`` record."""
    counts = reach_counts([step[column] for step in record["steps"]], len(kinds))
    return reached_fractions(counts, kinds, record["epochs"])


def load_results(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """row -> seed -> {"heldout": metrics, "train": metrics.json, "reached": {kind: fraction}, and "kept" where the
    record holds it} of every done job."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    cache: dict[str, dict[int, str]] = {}
    for job in jobs(out, [BASE, *ROWS], SEEDS):
        if not job.done:
            continue
        entry: dict[str, Any] = {"heldout": json.loads((job.dir / "heldout.json").read_text()), "train": {}}
        if job.row != BASE:
            entry["train"] = json.loads((job.dir / "metrics.json").read_text())
            record = json.loads((job.dir / "reached_loss.json").read_text())
            kinds = [job_kinds(loc, cache) for loc in record["locations"]]
            entry["reached"] = kind_fractions(record, REACHED, kinds)
            if all(len(step) > KEPT for step in record["steps"]):  # records from before the kept set was logged
                entry["kept"] = kind_fractions(record, KEPT, kinds)
        results.setdefault(job.row, {})[job.seed] = entry
    return results


METRICS = (
    ("heldout/nll", "held-out NLL / token ↓"),
    ("heldout/match_acc", "matching accuracy ↑"),
    ("heldout/match_hard_acc", "matching accuracy, hard negatives ↑"),
)


def by_seed(results: dict, row: str, metric: str) -> dict[int, float]:
    return {seed: entry["heldout"][metric] for seed, entry in results.get(row, {}).items()}


def table(results: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """The main table: every row's metrics (mean ± std over seeds) and their paired differences."""
    head = ["Row", "n"]
    for _, name in METRICS:
        head += [name, "Δ vs Random / Random, same budget", "Δ vs full (noisy)"]
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for row in [BASE, *ROWS]:
        if row not in results:
            continue
        cells = [row_name(row), str(len(results[row]))]
        for metric, _ in METRICS:
            values = by_seed(results, row, metric)
            cells.append(fmt_spread(*stats(list(values.values()))))
            for base in (ROWS[row].reference if row in ROWS else BASE, "full_noisy"):
                diff = paired(values, by_seed(results, base, metric)) if row not in (base, BASE) else None
                cells.append("—" if diff is None else fmt_spread(*diff, sign=True))
        lines.append(markdown_row(cells))
    return lines


def row_name(row: str) -> str:
    return ROWS[row].name if row in ROWS else "Base model (no training)"


def spent_share(results: dict[str, dict[int, dict[str, Any]]], row: str) -> float | None:
    """The row's response tokens in the loss over the run over full data's on the noisy set (means over seeds)."""
    tokens = "train/response_tokens_total"
    full = [e["train"][tokens] for e in results.get("full_noisy", {}).values()]
    entries = results.get(row, {}).values()
    return statistics.fmean(e["train"][tokens] for e in entries) / statistics.fmean(full) if full and entries else None


def matched_section(results: dict[str, dict[int, dict[str, Any]]], out: Path) -> list[str]:
    """Each metric's paired difference between the best Q-Tuning row and Random / Random at its spent response
    tokens, when that control has run."""
    if MATCHED not in results:
        return []
    matched = matched_budget(out)
    best = matched["row"]
    head = ["Row", "response tokens ÷ full", *(name for _, name in METRICS)]
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for row in (best, MATCHED):
        values = [fmt_spread(*stats(list(by_seed(results, row, metric).values()))) for metric, _ in METRICS]
        lines.append(markdown_row([row_name(row), fmt(spent_share(results, row)), *values]))
    deltas = [paired(by_seed(results, best, metric), by_seed(results, MATCHED, metric)) for metric, _ in METRICS]
    cells = ["—" if d is None else fmt_spread(*d, sign=True) for d in deltas]
    lines.append(markdown_row(["Δ (same seed)", "", *cells]))
    legend = (
        f"The best Q-Tuning row by mean held-out NLL, {row_name(best)}, spent {matched['share']:.3f} of full data's "
        f"response tokens; the control is Random / Random at r_sample {matched['r_sample']:g}, r_token "
        f"{matched['r_token']:.4f} (= {matched['share']:.3f} / {matched['r_sample']:g}), chosen once when every "
        "Q-Tuning job was done (`matched_budget.json`). Δ: the Q-Tuning row minus the control, per seed."
    )
    return ["## At equal response tokens", "", *lines, "", legend, ""]


def markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def kind_means(entries: Sequence[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Per kind, the mean over the seeds' entries of their ``key`` ("reached" or "kept") fraction; None if absent."""
    values = {kind: [e[key][kind] for e in entries if kind in e[key]] for kind in KINDS}
    return {kind: statistics.fmean(v) if v else None for kind, v in values.items()}


def sample_epochs(means: dict[str, float | None], kind_sizes: dict[str, int]) -> dict[str, float]:
    """Per kind, its mean fraction times its rows: the (sample, epoch) pairs per epoch it stands for."""
    return {kind: mean * kind_sizes.get(kind, 0) for kind, mean in means.items() if mean is not None}


def reached_table(results: dict[str, dict[int, dict[str, Any]]], kind_sizes: dict[str, int]) -> list[str]:
    """Per row, the mean over seeds of each kind's fraction that reached the loss, the corrupted kinds' mean ratio
    to clean's (1: as often as clean rows), the corrupted share of what reached the loss (``kind_sizes``: the
    training rows of each kind), the response tokens the loss learnt from over full data's on the noisy set, with
    the run's steps and training time."""
    head = ["Row", *KINDS, "noise ÷ clean", "noise share of the loss", "response tokens ÷ full", "optimizer steps",
            "training s / job"]  # fmt: skip
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for row in ROWS:
        entries = list(results.get(row, {}).values())
        if not entries:
            continue
        means = kind_means(entries, "reached")
        cells = [row_name(row), *(fmt(means[kind]) for kind in KINDS)]
        noisy = [means[k] for k in NOISE_KINDS if means[k] is not None]
        ratio = statistics.fmean(noisy) / means["clean"] if noisy and means["clean"] else None
        cells.append(fmt(ratio, 2))
        learnt = sample_epochs(means, kind_sizes)
        total = sum(learnt.values())
        cells.append(fmt(sum(learnt.get(k, 0.0) for k in NOISE_KINDS) / total if total else None, 2))
        cells.append(fmt(spent_share(results, row), 3))
        cells.append(fmt(statistics.fmean(e["train"]["trainer/global_step"] for e in entries), 0))
        cells.append(fmt(statistics.fmean(e["train"]["runtime_s"] for e in entries), 0))
        lines.append(markdown_row(cells))
    return lines


def kept_table(results: dict[str, dict[int, dict[str, Any]]], kind_sizes: dict[str, int]) -> list[str]:
    """Per row whose every record holds the kept set: the mean over seeds of each kind's fraction the sample
    decision kept, and the share of the kept (sample, epoch) pairs with no response token in the loss."""
    head = ["Row", *KINDS, "kept, no response token in the loss"]
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for row in ROWS:
        entries = list(results.get(row, {}).values())
        if not entries or not all("kept" in e for e in entries):
            continue
        means = kind_means(entries, "kept")
        kept = sum(sample_epochs(means, kind_sizes).values())
        reached = sum(sample_epochs(kind_means(entries, "reached"), kind_sizes).values())
        cells = [row_name(row), *(fmt(means[kind]) for kind in KINDS), fmt(1 - reached / kept if kept else None, 2)]
        lines.append(markdown_row(cells))
    return lines


def plot(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    """One panel per metric: every seed as a dot, the row mean ± std as a bar; full data (noisy) dashed. A last
    panel puts each trained job's held-out NLL against the response tokens its loss learnt from."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [r for r in [BASE, *ROWS] if r in results][::-1]  # the table's first row on top
    fig = Figure(figsize=(20, 0.45 * len(rows) + 1.5), layout="constrained")
    *panels, learnt = fig.subplots(1, len(METRICS) + 1, gridspec_kw={"width_ratios": [1] * len(METRICS) + [1.1]})
    for ax in panels[1:]:
        ax.sharey(panels[0])
        ax.tick_params(labelleft=False)
    for ax, (metric, name) in zip(panels, METRICS, strict=True):
        for y, row in enumerate(rows):
            values = list(by_seed(results, row, metric).values())
            mean, std = stats(values)
            colour = "tab:red" if row.startswith("qtuning") else "tab:blue"
            ax.errorbar(mean, y, xerr=std, fmt="o", color=colour, capsize=3)
            ax.scatter(values, [y + 0.15] * len(values), s=8, color="grey")
            if row == "full_noisy":
                ax.axvline(mean, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(rows)), [row_name(r) for r in rows])
        ax.set_title(name, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for i, row in enumerate(r for r in ROWS if r in results):
        entries = results[row].values()
        x = [e["train"]["train/response_tokens_total"] for e in entries]
        learnt.scatter(x, [e["heldout"]["heldout/nll"] for e in entries], s=18, color=f"C{i}", label=row_name(row))
    learnt.set_xscale("log")
    learnt.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    learnt.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    learnt.xaxis.set_minor_formatter(NullFormatter())
    learnt.set_xlabel("response tokens in the loss over the run (log scale)")
    learnt.set_title("held-out NLL ↓ against the tokens learnt from, per job", fontsize=10)
    learnt.grid(alpha=0.3)
    learnt.legend(fontsize=7)
    fig.suptitle("mean ± std over seeds (grey dots: the seeds); dashed: full data on the noisy set", fontsize=9)
    fig.savefig(path, dpi=110)


def report(out: Path, doc: Path, command: str) -> str:
    results = load_results(out)
    if not results:
        raise QTuningError(f"{out}: no finished job (no jobs/*/seed*/heldout.json); run `experiments.noisy_sft run`")
    plot_path = doc.with_suffix(".png")
    plot(results, plot_path)
    data = out / "data"
    kinds = [row["kind"] for row in read_jsonl(data / "train_noisy.jsonl", ["kind"])]
    kind_sizes = {k: kinds.count(k) for k in KINDS}
    noise_share = sum(kind_sizes[k] for k in NOISE_KINDS) / len(kinds)
    n_heldout = len(read_jsonl(data / "heldout.jsonl", ["prompt"]))
    timed = read_jsonl(out / "runs.jsonl", ["part", "seconds"]) if (out / "runs.jsonl").exists() else []
    wall_s = sum(entry["seconds"] for entry in timed)
    parts = {entry["part"] for entry in timed}
    expected = len(ROWS) * len(SEEDS) + 1
    done = sum(len(r) for r in results.values())
    lines = [
        "# Does Q-Tuning protect fine-tuning from bad data? A controlled noisy-SFT experiment",
        "",
        f"Command: `{command}` — {wall_s / 60:.0f} min of wall time in "
        f"{len(parts)} part(s) on this machine ({os.cpu_count()} CPU cores); {done} of {expected} jobs done.",
        "",
        f"Data (`python -m experiments.noisy_sft build`): {len(kinds)} real single-turn ShareGPT pairs for training, "
        + ", ".join(f"{kind_sizes[k]} {k}" for k in KINDS)
        + f"; {n_heldout} clean held-out pairs and as many matching triples. Setup: `conf/experiment/noisy_sft.yaml` "
        "(SmolLM2-135M-Instruct with LoRA, batch 8, lr 1e-3, budget s25_t50 unless a row names another); seeds "
        + ", ".join(map(str, SEEDS))
        + " of the training order.",
        "",
        "## Held-out metrics",
        "",
        *table(results),
        "",
        "Each cell: mean ± sample std over the row's n seeds; a Δ is the mean ± std of the per-seed differences "
        "(same seed, so the same data order) to that row. The held-out set is never pruned: the NLL counts every "
        "response token, and the matching accuracy compares a prompt's own response with the next held-out pair's "
        "by mean log-likelihood per token (ties half); with hard negatives, with the response of the held-out pair "
        "whose prompt is nearest by TF-IDF cosine (the same topic, often the same kind of request). The paired "
        "differences are taken to the Random / Random row at the same budget (s25_t50 or s50_t70).",
        "",
        f"![held-out metrics per row and seed]({plot_path.name})",
        "",
        "## What reached the loss",
        "",
        *reached_table(results, kind_sizes),
        "",
        "A kind's fraction: over the run, the optimizer steps in which its samples had a response token in the loss, "
        "over (its samples × epochs): 1 for full data; r_sample = 0.25 for a pruner blind to the noise. noise ÷ clean: "
        "the corrupted kinds' mean fraction over clean's; noise share of the loss: of the (sample, epoch) pairs that "
        f"reached the loss, the corrupted ones' share ({noise_share:.2f} of the training rows are corrupted); "
        "response tokens ÷ full: the response tokens in the loss over the run (`train/response_tokens_total`), over "
        "full data's on the noisy set.",
        "",
        *kept_section(results, kind_sizes),
        *matched_section(results, out),
        "## Sizing",
        "",
        SIZING.read_text().strip(),
        "",
        READING,
        "",
        earlier_reading(doc) or READING_TO_WRITE,
        "",
    ]
    return "\n".join(lines)


def kept_section(results: dict[str, dict[int, dict[str, Any]]], kind_sizes: dict[str, int]) -> list[str]:
    """The kept table with its heading and legend, or nothing when no row's records hold the kept set."""
    table = kept_table(results, kind_sizes)
    if len(table) == 2:
        return []
    legend = (
        "The same fractions for the samples the sample decision kept, whether or not a response token of theirs "
        "stayed in the loss (rows whose `reached_loss.json` records the kept set); the last column: of the kept "
        "(sample, epoch) pairs, the share whose every response token the token step pruned."
    )
    return ["## What the sample decision kept", "", *table, "", legend, ""]


READING = "## Reading"
READING_TO_WRITE = (
    "(Written by hand from the numbers above once every job is done: what they show, what they do not, and, where "
    "the robust rule does not beat Random / Random, what the reached-the-loss fractions and the runs' `csv/` logs "
    "suggest about why. A rerun of `report` keeps what is written here.)"
)


def earlier_reading(doc: Path) -> str | None:
    """The hand-written Reading of an earlier report at ``doc`` (everything after its heading), kept by a rerun."""
    if not doc.exists():
        return None
    _, found, reading = doc.read_text().partition(f"\n{READING}\n")
    reading = reading.strip()
    return reading if found and reading and reading != READING_TO_WRITE else None


# ---- time ----------------------------------------------------------------------------------------------------------


def time_steps(out: Path, steps: int) -> None:
    """A few optimizer steps of full data, Random / Random and Q-Tuning (the row shapes that set the cost), each in
    its own throwaway run directory; the step times come from the runs' own progress lines."""
    data = out / "data"
    for row in ("full_noisy", "random_random", "qtuning"):
        job = Job(row, 1, out / "timing" / row)
        extra = [f"trainer.max_steps={steps}", "save_model=false", "callbacks.progress.every_n_steps=1"]
        started = time.time()
        subprocess.run(train_command(job, data, extra, resume=False), cwd=ROOT, check=True)
        print(f"{row}: {steps} steps, {time.time() - started:.0f} s wall from start to end", flush=True)


@exit_on_bad_input
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="data and job directories (default logs/noisy_sft)")
    commands = parser.add_subparsers(dest="action", required=True)
    every = commands.add_parser("all", help="build the data unless built, run every job not yet done, report")
    b = commands.add_parser("build", help="write the data sets")
    r = commands.add_parser("run", help="train and score every job not yet done")
    w = commands.add_parser("report", help="write the Markdown report and its plot")
    for sub in (every, b):
        sub.add_argument("--n-train", type=int, default=176)
        sub.add_argument("--n-heldout", type=int, default=64)
        sub.add_argument("--noise", type=float, default=0.3)
        sub.add_argument("--seed", type=int, default=0)
    for sub in (every, r):
        sub.add_argument("--rows", nargs="+", default=[BASE, *ROWS], choices=[BASE, *ROWS])
        sub.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
        sub.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="for every training job")
    for sub in (every, w):
        sub.add_argument("--write", type=Path, default=ROOT / "docs" / "results" / "noisy_sft.md")
        command = "python -m experiments.noisy_sft all"
        sub.add_argument("--command", default=command, help="the command the report names")
    t = commands.add_parser("time", help="time a few steps of the row shapes that set the cost")
    t.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    built = all((args.out / "data" / name).exists() for name in FILES)
    if args.action == "build" or (args.action == "all" and not built):
        build(args.out, args.n_train, args.n_heldout, args.noise, args.seed)
    if args.action in ("all", "run"):
        run(args.out, args.rows, args.seeds, args.override)
    if args.action in ("all", "report"):
        args.write.parent.mkdir(parents=True, exist_ok=True)
        text = report(args.out, args.write, args.command)
        if earlier_reading(args.write):
            print(f"kept the Reading of {args.write}: check it against the new numbers", file=sys.stderr)
        args.write.write_text(text)
        print(text)
    if args.action == "time":
        time_steps(args.out, args.steps)


if __name__ == "__main__":
    main()
