"""Summarise a Hydra multirun: one CSV row per job, and a Markdown table in the layout of the paper's Table 1.

    qtuning-summarize logs/train/multiruns/2025-01-01_12-00-00            # or: python -m qtuning.summarize ...
    qtuning-summarize SWEEP_DIR --metrics val/loss val/ppl arc_easy/acc --out results/table1

Writes PREFIX.csv and PREFIX.md (PREFIX defaults to SWEEP_DIR/summary) and prints the Markdown.

Every directory below SWEEP_DIR holding ``.hydra/hydra.yaml`` is a job; one without ``metrics.json`` (crashed, killed
or still running) is listed as missing. The table has one block per budget (r_sample × r_token); its rows are sample
pruner × token pruner (``pruner=qtuning`` is "Q-Tuning"; ``pruner=none`` is "Full data", shown in every block and
counted once per seed, as it ignores the budget; a pruner without token pruning has token pruner "—"). Overrides
that differ between jobs split the table further: ``pruner.*`` ones into rows of their own (e.g. a λ sweep), the
others (model, data, batch, ...) into blocks of their own, so that every row is compared with the Random / Random
and Full-data rows trained like it. Jobs that differ only by ``seed`` share a row: mean ± sample std and their
number n. Default metrics: val/loss, val/ppl, every task metric found (any key outside val/, train/, trainer/,
prune/ and runtime_s), then the run's token totals where jobs report them (what each row's training cost: loss
tokens, and positions through the forward and the backward passes). Beside those totals (the default, or
--metrics naming them), two last columns give each row's spent budget: its response tokens learnt from and its
backward positions as shares of its block's full-data run, marked when more than 10% off what the slot's label gives
it (r_sample × r_token and r_sample; `SPENT`).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from qtuning import TOKEN_TOTALS
from qtuning.errors import QTuningError, exit_on_bad_input

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NAMES = {
    "random": "Random",
    "longest": "Longest",
    "shortest": "Shortest",
    "infobatch": "InfoBatch",
    "infobatch_truncated": "InfoBatch (truncated)",
    "entropy": "Entropy",
    "ppl": "PPL",
    "fastv": "FastV",
    "fastv_authors": "FastV",  # at lr_scale 0.5, which labels the row
    "sparsevlm": "SparseVLM",
    "sparsevlm_inverted": "SparseVLM (inverted)",
    "sparsevlm_authors": "SparseVLM (inverted)",  # at lr_scale 0.5
    "rho1": "Rho-1",
    "random_batch": "Random (in-batch)",
}
QTUNING = "Q-Tuning"
QTUNING_TRIAGE = {"fill_up": "minmax", "ppl_guard": 0.0}  # the authors' triage; other values name their own row
FULL = "Full data"
ZERO_SHOT = "Zero-shot (base)"  # a `python -m qtuning.eval` job: the model before any fine-tuning
BUDGETLESS = (FULL, ZERO_SHOT)  # rows that ignore the budget: shown in every block
NO_TOKEN = "—"
# rows: these sample pruners in this order, then unknown names, Q-Tuning, Full data
SAMPLE_ORDER = ["Random", "Longest", "Shortest", "InfoBatch", "InfoBatch (truncated)", "Entropy"]
TOKEN_ORDER = ["Random", "PPL", "FastV", "SparseVLM", "SparseVLM (inverted)", "Rho-1", NO_TOKEN]
# The spent budget of a row: its run total over the full-data run's, and the fraction its slot's label gives it
# (r_sample, r_token). Loss tokens are the response tokens learnt from (train/loss_tokens_total would count the prompt
# positions a nonpad token pruner keeps); no pruner here shortens a kept sample's backward pass (token pruners mask
# the loss), so a slot's label gives it r_sample of the backward positions.
SPENT = {
    "spent loss tokens": ("train/response_tokens_total", lambda r_sample, r_token: r_sample * r_token),
    "spent bwd tokens": ("prune/bwd_tokens_total", lambda r_sample, r_token: r_sample),
}
OFF_LABEL = 0.10  # a spent fraction further than this (relative) from its label is marked
DEFAULT_METRICS = ["val/loss", "val/ppl"]
RUN_METRIC_PREFIXES = ("val/", "train/", "trainer/", "prune/", "eval/")
LOWER_IS_BETTER = ("loss", "ppl", "perplexity")
# Columns of their own, never row or block splitters: seed in particular, so that replicates share a row; a
# ``method`` (the presets of sweeps run before they were folded into pruner/sample x pruner/token) is only a name for
# the pruner choices it set.
OWN_COLUMNS = {"pruner", "pruner/sample", "pruner/token", "budget", "seed", "method"}
CSV_FIXED = ["job", "status", "pruner", "sample_pruner", "token_pruner", "budget", "r_sample", "r_token", "seed"]


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise QTuningError(f"{path}: cannot read ({err.__class__.__name__}: {err})") from None


def read_metrics(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise QTuningError(f"{path}: cannot read ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict):
        raise QTuningError(f"{path}: expected a JSON object of metrics")
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def parse_override(text: str) -> tuple[str, str]:
    """``key=value`` as written on the command line; ``+``/``++`` dropped, a deletion ``~key`` has value ``~``."""
    if text.startswith("~"):
        return text[1:].split("=", 1)[0], "~"
    key, _, value = text.lstrip("+").partition("=")
    return key, value


def label(name: Any) -> str:
    return NO_TOKEN if name in (None, "none") else NAMES.get(str(name), str(name))


def pruner_labels(choices: dict[str, Any], pruner_cfg: dict[str, Any] | None = None) -> tuple[str, str]:
    """(sample pruner, token pruner) as the paper names them, from Hydra's config-group choices; a Q-Tuning triage
    other than the authors' (set by a preset such as pruner=qtuning_robust, not an override) is named in the label."""
    if "pruner" not in choices:
        return ZERO_SHOT, NO_TOKEN
    pruner = str(choices.get("pruner"))
    if pruner in ("qtuning", "qtuning_robust"):
        variant = [
            f"{k}={v}" for k, default in QTUNING_TRIAGE.items() if (v := (pruner_cfg or {}).get(k, default)) != default
        ]
        return QTUNING + (f" ({', '.join(variant)})" if variant else ""), NO_TOKEN
    if pruner == "none":
        return FULL, NO_TOKEN
    if "pruner/sample" in choices or "pruner/token" in choices:  # combo, or a preset built on it (pruner=random)
        return label(choices.get("pruner/sample")), label(choices.get("pruner/token"))
    return label(pruner), NO_TOKEN


def ratio(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def load_job(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    hydra_dir = job_dir / ".hydra"
    hydra_cfg = read_yaml(hydra_dir / "hydra.yaml") or {}
    choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    config = read_yaml(hydra_dir / "config.yaml") or {}
    overrides = dict(parse_override(str(o)) for o in read_yaml(hydra_dir / "overrides.yaml") or [])
    budget = config.get("budget") or {}
    sample, token = pruner_labels(choices, config.get("pruner"))
    metrics_file = job_dir / "metrics.json"
    return {
        "job": job_dir.relative_to(sweep_dir).as_posix(),
        "status": "done" if metrics_file.exists() else "missing",
        "pruner": choices.get("pruner"),
        "sample": sample,
        "token": token,
        "budget": choices.get("budget"),
        "r_sample": ratio(budget.get("r_sample")),
        "r_token": ratio(budget.get("r_token")),
        "seed": config.get("seed"),
        "lr_scale": config.get("lr_scale", 1.0),  # a preset's (the authors' FastV and SparseVLM rows: 0.5)
        "overrides": {k: v for k, v in overrides.items() if k not in OWN_COLUMNS},
        "metrics": read_metrics(metrics_file) if metrics_file.exists() else {},
    }


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every Hydra job below ``sweep_dir`` (finished or not), sorted by directory."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise QTuningError(f"{sweep_dir}: no such directory")
    job_dirs = sorted({p.parent.parent for p in sweep_dir.rglob(".hydra/hydra.yaml")})
    if not job_dirs:
        raise QTuningError(f"{sweep_dir}: no Hydra job found (no .hydra/hydra.yaml below it)")
    return [load_job(d, sweep_dir) for d in job_dirs]


def default_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """val/loss, val/ppl, every task metric (e.g. arc_easy/acc) that some job reports, then its token totals."""
    found = set().union(*(r["metrics"] for r in rows))
    tasks = sorted(
        k for k in found if not k.startswith(RUN_METRIC_PREFIXES) and k != "runtime_s" and not k.endswith("_stderr")
    )
    return DEFAULT_METRICS + tasks + [k for k in TOKEN_TOTALS if k in found]


def varying_keys(rows: list[dict[str, Any]]) -> set[str]:
    """Override keys whose value is not the same in every job (absent counts as a value)."""
    keys = set().union(*(r["overrides"] for r in rows))
    return {k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1}


def pct(r: float) -> str:
    return f"{100 * r:g}%"


def block_title(r_sample: float | None, r_token: float | None, budget: str | None) -> str:
    if r_sample is None or r_token is None:
        return f"budget {budget}"
    return f"{pct(r_sample)} samples × {pct(r_token)} tokens"


def row_order(sample: str, token: str) -> tuple[int, str, int, str]:
    if sample in SAMPLE_ORDER:
        s_rank = SAMPLE_ORDER.index(sample)
    else:
        s_rank = -1 if sample == ZERO_SHOT else len(SAMPLE_ORDER) + (1 if sample.startswith(QTUNING) else 0)
        s_rank += 2 if sample == FULL else 0
    t_rank = TOKEN_ORDER.index(token) if token in TOKEN_ORDER else len(TOKEN_ORDER)
    return s_rank, sample, t_rank, token


def stats(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def number(value: float, metric: str, sign: str = "") -> str:
    """Three decimals; token totals (counts) as whole numbers with thousands separators."""
    if metric in TOKEN_TOTALS:
        return f"{value:{sign},.0f}"
    return f"{round(value, 3) + 0.0:{sign}.3f}"  # + 0.0: no "-0.000"


def signed(delta: float, metric: str) -> str:
    return number(delta, metric, "+").replace("-", "−")


def spread(group: list[dict], metric: str) -> tuple[float, float | None, int] | None:
    """(mean, error, number of values) of a row's metric: the error is the sample std over its jobs when n > 1, or
    the standard error lm-eval reports for a single job's task metric; None when no job has the metric."""
    values = [r["metrics"][metric] for r in group if metric in r["metrics"]]
    if not values:
        return None
    mean, std = stats(values)
    if std is None and f"{metric}_stderr" in group[0]["metrics"]:
        std = group[0]["metrics"][f"{metric}_stderr"]
    return mean, std, len(values)


def cell(group: list[dict], metric: str, baselines: list[list[dict] | None]) -> str:
    summary = spread(group, metric)
    if summary is None:
        return "—"
    mean, error, n = summary
    text = number(mean, metric) if error is None else f"{number(mean, metric)} ± {number(error, metric)}"
    if n < len(group):
        text += f" (n={n})"
    deltas = []
    for base in baselines:
        base_values = [r["metrics"][metric] for r in base or [] if metric in r["metrics"]]
        deltas.append("—" if base is group or not base_values else signed(mean - statistics.fmean(base_values), metric))
    return f"{text} ({' / '.join(deltas)})"


def spent_fraction(group: list[dict], full: list[dict] | None, total: str) -> float | None:
    """A row's mean run ``total`` over the full-data row's of its block; None without either."""
    row = [r["metrics"][total] for r in group if total in r["metrics"]]
    base = [r["metrics"][total] for r in full or [] if total in r["metrics"]]
    if not row or not base or not statistics.fmean(base):
        return None
    return statistics.fmean(row) / statistics.fmean(base)


def label_fraction(sample: str, group: list[dict], share: Callable[[float, float], float]) -> float | None:
    """The fraction of the full-data run a row's slot label gives it: 1 for full data, ``share(r_sample, r_token)``
    for a budgeted row, None for the zero-shot row or a budget without ratios."""
    if sample == FULL:
        return 1.0
    r_sample, r_token = group[0]["r_sample"], group[0]["r_token"]
    if sample == ZERO_SHOT or r_sample is None or r_token is None:
        return None
    return share(r_sample, r_token)


def spent_cell(spent: float | None, label: float | None) -> str:
    """``0.131``, marked ``⚠ +180%`` when more than OFF_LABEL off ``label``; — without a value."""
    if spent is None:
        return "—"
    off = spent / label - 1 if label else 0.0
    return f"{spent:.3f}" + (f" ⚠ {100 * off:+.0f}%".replace("-", "−") if abs(off) > OFF_LABEL else "")


RowKey = tuple[str, str, tuple[str, ...]]  # (sample pruner, token pruner, pruner.* overrides)


def layout(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, dict[RowKey, list[dict]]]], list[str], bool]:
    """The table's blocks in order, each (heading, {row key: jobs} in display order) with the full-data and zero-shot
    rows in every block, as in the paper; the overrides common to every training job; whether a full-data job was
    seen again under another budget (and counted once)."""
    # zero-shot jobs (`qtuning.eval` of the base model) share no training overrides: they join every block as they are
    zero_shot = [r for r in rows if r["status"] == "done" and r["sample"] == ZERO_SHOT]
    done = [r for r in rows if r["status"] == "done" and r["sample"] != ZERO_SHOT]
    varying = varying_keys([r for r in rows if r["sample"] != ZERO_SHOT])
    variant_keys = sorted(k for k in varying if k.startswith(("pruner.", "pruner/")))
    context_keys = sorted(k for k in varying if k not in variant_keys and not k.startswith("budget"))

    # context → budget (None for full data) → (sample, token, variant) → jobs
    groups: dict[tuple, dict[tuple | None, dict[RowKey, list[dict]]]] = defaultdict(lambda: defaultdict(dict))
    titles: dict[tuple, str] = {}
    full_seen = set()
    for r in done:
        context = tuple((k, r["overrides"].get(k, "—")) for k in context_keys)
        variant = tuple(f"{k}={r['overrides'][k]}" for k in variant_keys if k in r["overrides"])
        if r["lr_scale"] != 1.0 and "lr_scale" not in r["overrides"]:  # set by the row's preset: a row of its own
            variant += (f"lr_scale={r['lr_scale']}",)
        budget = None if r["sample"] in BUDGETLESS else (r["r_sample"] or 0.0, r["r_token"] or 0.0, str(r["budget"]))
        if budget is not None:
            titles[budget] = block_title(r["r_sample"], r["r_token"], r["budget"])
        elif (context, variant, r["seed"]) in full_seen:
            continue  # the same full-data run again under another budget: not a replicate
        else:
            full_seen.add((context, variant, r["seed"]))
        groups[context][budget].setdefault((r["sample"], r["token"], variant), []).append(r)

    if zero_shot and not groups:
        groups[()] = defaultdict(dict)
    ordered = []
    for context in sorted(groups):
        blocks = groups[context]
        if zero_shot:
            blocks[None][(ZERO_SHOT, NO_TOKEN, ())] = zero_shot
        full_rows = blocks.get(None, {})  # full data and zero-shot
        suffix = "".join(f" · {k}={v}" for k, v in context)
        for budget in sorted((b for b in blocks if b is not None), key=lambda b: b[:2]) or [None]:
            block = dict(blocks.get(budget, {})) if budget is not None else {}
            block.update(full_rows)
            keys = sorted(block, key=lambda k: (*row_order(k[0], k[1]), k[2]))
            ordered.append(((titles[budget] if budget is not None else FULL) + suffix, {k: block[k] for k in keys}))
    common = sorted(
        {f"{k}={v}" for r in rows if r["sample"] != ZERO_SHOT for k, v in r["overrides"].items() if k not in varying}
    )
    return ordered, common, bool(full_seen)


def row_name(key: RowKey) -> str:
    sample, _, variant = key
    return sample + (f" ({', '.join(variant)})" if variant else "")


def table(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    """The Markdown summary: common overrides, the table in Table 1's layout, its legend, the missing jobs."""
    blocks, common, full_counted_once = layout(rows)
    spent = [c for c, (total, _) in SPENT.items() if total in metrics]  # beside the totals they come from
    lines = []
    if common:
        lines += ["Same in every job: " + " ".join(f"`{o}`" for o in common), ""]
    lines += [
        "| Sample pruner | Token pruner | n | " + " | ".join(metrics + spent) + " |",
        "|---|---|---|" + "---|" * len(metrics + spent),
    ]
    for heading, block in blocks:
        lines.append(f"| **{heading}** |" + " |" * (2 + len(metrics + spent)))
        random_random, full = block.get(("Random", "Random", ())), block.get((FULL, NO_TOKEN, ()))
        for key, group in block.items():
            cells = [cell(group, m, [random_random, full]) for m in metrics]
            for column in spent:
                total, share = SPENT[column]
                cells.append(spent_cell(spent_fraction(group, full, total), label_fraction(key[0], group, share)))
            lines.append(f"| {row_name(key)} | {key[1]} | {len(group)} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "Each cell: the mean over the row's n jobs (± their sample standard deviation when n > 1, or the standard "
        "error lm-eval reports for a single job's task metric), then in brackets "
        "its difference to Random / Random of the same block and to Full data; — where that row is missing or is "
        "the row itself.",
    ]
    if full_counted_once:
        lines[-1] += " Full data counts one job per seed, whatever its budget (which it ignores)."
    lower = [m for m in metrics if any(w in m.lower() for w in LOWER_IS_BETTER) and m not in TOKEN_TOTALS]
    if lower:
        lines[-1] += f" Lower is better for losses and perplexities ({', '.join(lower)})."
    if spent:
        lines[-1] += (
            " Spent budget: a row's run total over the full-data row's of its block, for loss tokens the response "
            "tokens its loss was computed on (`train/response_tokens_total`; prompt positions that a nonpad token "
            "pruner counts in the loss carry no loss), for bwd tokens the positions through its backward passes "
            "(`prune/bwd_tokens_total`). A slot's label gives a row r_sample × r_token of the loss tokens (s25_t50: "
            "0.125) and r_sample of the backward positions (token pruners mask the loss, none shortens a sample's "
            f"backward pass); ⚠ marks a fraction more than {OFF_LABEL:.0%} (relative) off its label, by how much."
        )
    if not any(r["status"] == "done" and r["sample"] != ZERO_SHOT for r in rows):
        lines += ["", "No job has finished."]
    missing = [r for r in rows if r["status"] == "missing"]
    if missing:
        lines += ["", f"**Missing** (no metrics.json: crashed, killed or still running), {len(missing)} job(s):"]
        for r in missing:
            budget = "" if r["sample"] in BUDGETLESS else f", {block_title(r['r_sample'], r['r_token'], r['budget'])}"
            lines.append(f"- `{r['job']}`: {r['sample']} / {r['token']}{budget}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> Figure:
    """One panel per block × metric: each row's mean with its error bar (± the std or lm-eval standard error of the
    table), the full-data mean dashed and the zero-shot mean dotted, so that overlapping rows show at a glance."""
    from matplotlib.figure import Figure  # only for --plot: the table needs no matplotlib

    blocks, _, _ = layout(rows)
    height = max(len(block) for _, block in blocks) * 0.32 + 1.2
    fig = Figure(figsize=(3.2 * len(metrics) + 2.5, height * len(blocks)), layout="constrained")
    axes = fig.subplots(len(blocks), len(metrics), squeeze=False, sharey="row")
    for (heading, block), row_axes in zip(blocks, axes, strict=True):
        keys = list(block)[::-1]  # the table's first row on top
        labels = [row_name(k) + ("" if k[1] == NO_TOKEN else f" / {k[1]}") for k in keys]
        for metric, ax in zip(metrics, row_axes, strict=True):
            for y, key in enumerate(keys):
                summary = spread(block[key], metric)
                if summary is None:
                    continue
                mean, error, _ = summary
                color = "tab:red" if key[0].startswith(QTUNING) else "tab:blue"
                ax.errorbar(mean, y, xerr=error, fmt="o", color=color, capsize=3)
                style = {FULL: "--", ZERO_SHOT: ":"}.get(key[0])
                if style:
                    ax.axvline(mean, color="grey", linestyle=style, linewidth=1)
            ax.set_yticks(range(len(keys)), labels)
            ax.set_title(f"{metric}\n{heading}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        "error bars: ± the std over seeds (n > 1) or lm-eval's standard error (one job); "
        "dashed: full data, dotted: zero-shot; red: Q-Tuning",
        fontsize=8,
    )
    fig.savefig(path, dpi=120)
    return fig


def csv_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Fixed columns, then every override key, then every metric (each sorted)."""
    overrides = sorted(set().union(*(r["overrides"] for r in rows)))
    metrics = sorted(set().union(*(r["metrics"] for r in rows)))
    return CSV_FIXED + overrides + metrics


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(rows))
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "job": r["job"],
                    "status": r["status"],
                    "pruner": r["pruner"],
                    "sample_pruner": r["sample"],
                    "token_pruner": r["token"],
                    "budget": r["budget"],
                    "r_sample": r["r_sample"],
                    "r_token": r["r_token"],
                    "seed": r["seed"],
                    **r["overrides"],
                    **r["metrics"],
                }
            )


@exit_on_bad_input
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--metrics", nargs="+", default=None, help="table columns (default: see above)")
    parser.add_argument("--out", type=Path, default=None, help="write PREFIX.csv and PREFIX.md (SWEEP_DIR/summary)")
    parser.add_argument("--plot", action="store_true", help="also PREFIX.png: every row's metrics with error bars")
    args = parser.parse_args(argv)
    rows = collect(args.sweep_dir)
    metrics = args.metrics or default_metrics(rows)
    for m in metrics:
        if not any(m in r["metrics"] for r in rows):
            print(f"warning: no job of {args.sweep_dir} has the metric {m}", file=sys.stderr)
    text = f"# Sweep {args.sweep_dir}\n\n" + table(rows, metrics)
    prefix = args.out or args.sweep_dir / "summary"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, prefix.with_name(prefix.name + ".csv"))
    prefix.with_name(prefix.name + ".md").write_text(text)
    if args.plot:
        plot(rows, metrics, prefix.with_name(prefix.name + ".png"))
    print(text, end="")


if __name__ == "__main__":
    main()
