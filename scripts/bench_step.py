"""What one optimizer step and one validation pass cost, and their peak memory, side by side in one process.

    python -m scripts.bench_step --model smollm2_135m:256 random_llama3_head:1024 --write docs/benchmarks.md
    python -m scripts.bench_step --model random_smollm2_135m:2048 --precision bf16-mixed --kinds full   # a GPU

Each model (``NAME[:LENGTH]``, a `conf/model` option and the sequence length, 256 by default) is measured on one batch
of ``--batch`` rows of random tokens, at r_sample 0.25 and r_token 0.5, for full fine-tuning and LoRA:
- ``full``: full-data SFT (``pruner=none``), forward + backward over all rows;
- ``shared``: Q-Tuning as the authors ran it, one forward over all rows, pruning only masks the loss;
- ``separate``: Q-Tuning's default, a no-grad scoring pass, then forward + backward on the kept rows;
- ``ideal``: a bare no-grad backbone forward over all rows plus a plain step over the kept rows: the floor for
  ``separate``;
- ``scoring``: the no-grad scoring pass alone (NLL and entropy at every non-pad position);
- ``validation``: one no-grad validation pass over the batch.
With ``--windows A ...``, one optimizer step over a global batch of A micro-batches of ``--batch`` rows (their lengths
shuffled, as a real window's are), A at a time:
- ``local/A``: Q-Tuning's default, each micro-batch scored, decided and its kept rows trained on its own;
- ``window/A``: ``threshold_scope=window``, one scoring pass per micro-batch, one decision over the window, the kept
  rows re-packed by length into micro-batches of at most ``--batch`` rows (as `SFTModule.train_kept` groups them);
- ``unpacked/A``: the same decision, each micro-batch's kept rows trained on their own (what re-packing saves).
These are what `SFTModule` runs (its `score`, `decide` and `train_rows`): the LM head only at the positions that
count, in chunks. (The full-logits path the code ran before is retired; its numbers stay in docs/benchmarks.md.)

With ``--padding-free DATA ...`` (``pairs``: real single-turn ShareGPT pairs; ``chats``: the multi-turn conversations),
it measures instead right-padded against packed passes (``data.padding_free``) on random batches of ``--batch`` real
rows at the model's sequence length, SmolLM2's tokenizer and chat template: ``full`` and ``separate`` (Q-Tuning), each
``+packed``; per mode the positions through its scoring and training passes per real token, the step time (the
median over the rounds, one batch per round, the same for every mode) and the peak memory of its first step. The
layout alone is also counted over 1,000 batches.

Step time: the median over ``--steps`` rounds after ``--warmup`` rounds; modes interleaved in random order, each timed
step right after an untimed one of the same mode (steady state, not the cost of regrowing another mode's memory).
Peak memory: one step of each mode (the optimizer's state created in it) above the memory once the model, the batch
and the optimizer are loaded: on CPU the kernel's peak resident set, each mode in a fresh process; on CUDA
``max_memory_allocated``, in this process with a fresh optimizer per mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from qtuning.config import config_dir
from qtuning.models import build_model, build_tokenizer
from qtuning.module import SFTModule, StepScope
from qtuning.ops import (
    Layout,
    final_hidden_states,
    length_groups,
    output_head,
    scoring_forward,
    select_rows,
    shift_targets,
    token_loss,
)
from qtuning.pruning import NoPruning, QTuningPolicy
from scripts.bench_data import SHAREGPT, build_pairs

ROOT = Path(__file__).resolve().parents[1]  # where `python -m scripts.bench_step` finds this file (memory probes)

R_SAMPLE, R_TOKEN = 0.25, 0.5
MODES = ("full", "shared", "separate", "ideal", "scoring", "validation")
LAYOUT_MODES = ("full", "full+packed", "separate", "separate+packed")
LAYOUT_BATCHES = 1_000  # batches whose layout alone is counted
WINDOW_KINDS = ("local", "window", "unpacked")
Batch = dict[str, torch.Tensor]


def model_config(name: str, lora: bool, overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", f"model.lora.enabled={lora}", *overrides])
    return cfg.model, os.path.expanduser(os.environ.get("QTUNING_CACHE_DIR", "~/.cache/qtuning"))


def window_modes(windows: list[int]) -> list[str]:
    return [f"{kind}/{accumulate}" for accumulate in windows for kind in WINDOW_KINDS]


def make_batch(vocab: int, batch: int, length: int, device: torch.device, shuffle: bool = False) -> Batch:
    """Random tokens; a 64-token prompt; lengths spread over [3/4, 1] of ``length`` (right padding), in rising order
    or (``shuffle``) a seeded random one."""
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    lengths = torch.linspace(length * 3 // 4, length, batch).long()
    if shuffle:
        lengths = lengths[torch.randperm(batch, generator=gen)]
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : min(64, length // 2)] = -100
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
        "sample_idx": torch.arange(batch, device=device),
    }


class Bench:
    """One model and batch, with a step function for every mode."""

    def __init__(self, args: argparse.Namespace, name: str, lora: bool, length: int, device: torch.device):
        mixed = ["model.dtype=fp32"] if args.precision != "32-true" else []  # mixed precision keeps fp32 weights
        overrides = [*args.override, *mixed]
        cfg, cache = model_config(name, lora, overrides)
        tokenizer = build_tokenizer(cfg, cache)
        with device:  # a random-init model is initialised where it runs
            self.model = build_model(cfg, cache, vocab_size=len(tokenizer)).to(device)
        batch_size, precision = args.batch, args.precision
        self.batch = make_batch(len(tokenizer), batch_size, length, device)
        self.device = device
        self.dtype = torch.bfloat16 if precision == "bf16-mixed" else None
        self.optimizer = self.new_optimizer()
        self.micro = batch_size
        self.modules = {
            "full": SFTModule(self.model, NoPruning(), optimizer=torch.optim.AdamW),
            "shared": SFTModule(self.model, QTuningPolicy(R_SAMPLE, R_TOKEN, scoring="shared"), torch.optim.AdamW),
            "separate": SFTModule(self.model, QTuningPolicy(R_SAMPLE, R_TOKEN), optimizer=torch.optim.AdamW),
        }
        self.windows = {
            a: make_batch(len(tokenizer), a * batch_size, length, device, shuffle=True) for a in args.windows
        }
        self.window_modules = {
            a: SFTModule(
                self.model,
                QTuningPolicy(R_SAMPLE, R_TOKEN, threshold_scope="window"),
                optimizer=torch.optim.AdamW,
                scope=StepScope("window", batch_size, a),
            )
            for a in args.windows
        }
        self.trained_positions: dict[str, int] = {}  # of the window modes' last step, padding included
        with self.autocast():
            decision = self.modules["separate"].decide(self.modules["separate"].score(self.batch).stats)
        self.kept_rows = decision.sample_keep.nonzero()[:, 0]

    def new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-6)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, mode: str) -> None:
        """One optimizer step (or validation pass) of ``mode``."""
        if "/" in mode:
            return self.window_step(mode)
        if mode in ("scoring", "validation"):
            with torch.no_grad(), self.autocast():
                if mode == "scoring":
                    scoring_forward(self.model, self.batch)
                    return None
                hidden = final_hidden_states(self.model, self.batch)
                token_loss(hidden, output_head(self.model), self.batch["labels"], self.batch["attention_mask"])
                return None
        with self.autocast():
            if mode == "ideal":
                with torch.no_grad():
                    final_hidden_states(self.model, self.batch)
                kept = select_rows(self.batch, self.kept_rows)
                hidden = final_hidden_states(self.model, kept)
                loss_sum, _ = token_loss(hidden, output_head(self.model), kept["labels"], kept["attention_mask"])
                weight = shift_targets(kept["labels"], kept["attention_mask"])[1].float()
            else:
                module = self.modules[mode]
                scored = module.score(self.batch)
                (trained,) = module.train_kept(self.batch, scored, module.decide(scored.stats), batch_idx=0)
                loss_sum, weight = trained.loss_sum, trained.weight
            loss = loss_sum / weight.sum().clamp(min=1)
        self.backward_and_step(loss)

    def window_step(self, mode: str) -> None:
        """One optimizer step of a window mode over its global batch; every micro-batch's backward pass accumulates
        (the gradients are not normalised over the window: the time is the same)."""
        kind, accumulate = mode.split("/")
        batch = self.windows[int(accumulate)]
        chunks = torch.arange(batch["input_ids"].shape[0], device=self.device).split(self.micro)
        trained = 0
        if kind == "local":
            module = self.modules["separate"]
            for chunk in chunks:
                micro = select_rows(batch, chunk)
                with self.autocast():
                    scored = module.score(micro)
                    (result,) = module.train_kept(micro, scored, module.decide(scored.stats), batch_idx=0)
                result.loss_sum.backward()
                trained += result.backward_positions
        else:
            module = self.window_modules[int(accumulate)]
            with self.autocast():
                scored = module.score(batch)
                decision = module.decide(scored.stats)
            if kind == "unpacked":
                groups = [kept for chunk in chunks if (kept := chunk[decision.sample_keep[chunk]]).numel()]
            else:
                groups = length_groups(decision.sample_keep, scored.stats.nonpad_mask.sum(1), self.micro)
            for rows in groups:
                with self.autocast():
                    result = module.train_rows(batch, rows, decision)
                result.loss_sum.backward()
                trained += result.backward_positions
        self.trained_positions[mode] = trained
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def real_batches(args: argparse.Namespace, data: str, tokenizer, length: int, n: int) -> list[Batch]:
    """``n`` batches of ``--batch`` rows drawn (seeded) from real ShareGPT data at ``length`` tokens (``pairs``: the
    first ``--rows`` single-turn pairs of ``--sharegpt``; ``chats``: its first ``--rows`` conversations), right-padded
    as the data module's loader pads them."""
    from qtuning.data import SFTDataModule, collate

    if data == "pairs":
        path = ROOT / "logs" / "bench_data" / f"{Path(args.sharegpt).stem}_pairs_{args.rows}.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            build_pairs(path, args.rows, source=args.sharegpt)
        source = {"path": str(path), "format": "prompt_completion"}
    else:
        salvage = args.sharegpt.endswith(".json")  # the package's file is cut off mid-record
        source = {"path": args.sharegpt, "format": "sharegpt", "salvage_truncated": salvage, "limit": args.rows}
    datamodule = SFTDataModule(tokenizer, max_length=length, batch_size=args.batch, **source)
    datamodule.prepare_data()
    datamodule.setup("fit")
    examples, draw = datamodule.train_examples, random.Random(0)
    picks = [draw.sample(range(len(examples)), args.batch) for _ in range(n)]
    return [collate([examples[i] for i in rows], rows, datamodule.pad_id) for rows in picks]


class LayoutBench:
    """One model, padded and packed modules over the same real batches."""

    def __init__(self, args: argparse.Namespace, data: str, name: str, lora: bool, length: int, n: int, device):
        mixed = ["model.dtype=fp32"] if args.precision != "32-true" else []
        cfg, cache = model_config(name, lora, [*args.override, *mixed])
        tokenizer = build_tokenizer(cfg, cache)
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in real_batches(args, data, tokenizer, length, n)]
        with device:
            self.model = build_model(cfg, cache, vocab_size=len(tokenizer)).to(device)
        self.device, self.dtype = device, torch.bfloat16 if args.precision == "bf16-mixed" else None
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-6)
        policies = {"full": NoPruning, "separate": lambda: QTuningPolicy(R_SAMPLE, R_TOKEN)}
        self.modules = {
            mode: SFTModule(
                self.model,
                policies[mode.split("+")[0]](),
                optimizer=torch.optim.AdamW,
                layout=Layout(packed=mode.endswith("+packed"), capacity=length),
            )
            for mode in LAYOUT_MODES
        }
        # per mode: [scoring positions, their real tokens, training positions, their real tokens]
        self.positions = {mode: [0, 0, 0, 0] for mode in LAYOUT_MODES}

    def step(self, mode: str, i: int) -> None:
        module, batch = self.modules[mode], self.batches[i]
        with autocast(self.device, self.dtype):
            scored = module.score(batch)
            passes = module.train_kept(batch, scored, module.decide(scored.stats), batch_idx=0)
        loss = sum(p.loss_sum for p in passes) / sum(p.weight.sum() for p in passes).clamp(min=1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        real = batch["attention_mask"].sum(1)  # [B]
        counts = self.positions[mode]
        counts[0] += scored.positions
        counts[1] += int(real.sum()) if scored.positions else 0
        counts[2] += sum(p.forward_positions for p in passes)
        counts[3] += sum(int(real[p.rows].sum()) for p in passes)


def fewest_positions(lengths: list[int], capacity: int) -> int:
    """A floor under any packing of ``lengths`` into equal rows of at most ``capacity``: R rows are at least as wide
    as the longest sample and as ``Σ / R``."""
    total, longest = sum(lengths), max(lengths)
    return min(r * max(longest, -(-total // r)) for r in range(-(-total // capacity), len(lengths) + 1))


def layout_ratios(batches: list[Batch], capacity: int) -> dict[str, float]:
    """Positions per real token of a pass over all of each batch's rows: padded, packed, and the floor of any
    packing into rows of at most ``capacity``."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(Layout().rows(b).positions_run for b in batches)
    packed = sum(Layout(packed=True, capacity=capacity).rows(b).positions_run for b in batches)
    floor = sum(fewest_positions(b["attention_mask"].sum(1).tolist(), capacity) for b in batches)
    return {"padded": padded / real, "packed": packed / real, "floor": floor / real}


def measure_layouts(args: argparse.Namespace, data: str, name: str, lora: bool, length: int, device) -> dict:
    tokenizer = build_tokenizer(*model_config(name, lora, args.override))
    layout = layout_ratios(real_batches(args, data, tokenizer, length, LAYOUT_BATCHES), length)
    if args.layout_only:
        return {"layout": layout}
    rounds = args.warmup + args.steps
    bench = LayoutBench(args, data, name, lora, length, rounds, device)
    times: dict[str, list[float]] = {mode: [] for mode in LAYOUT_MODES}
    order = random.Random(0)
    for i in range(rounds):
        for mode in order.sample(LAYOUT_MODES, len(LAYOUT_MODES)):
            t = timed(lambda m=mode, i=i: bench.step(m, i), device)
            if i >= args.warmup:
                times[mode].append(t)
    positions = bench.positions
    bench = None  # the memory probes run in fresh processes
    memory = dict.fromkeys(LAYOUT_MODES)
    if args.memory and device.type == "cpu":
        memory = {mode: memory_probe(args, name, lora, length, mode, data) for mode in LAYOUT_MODES}
    medians = {mode: statistics.median(ts) for mode, ts in times.items()}
    return {"medians": medians, "memory": memory, "positions": positions, "layout": layout}


def layout_report(results: dict, args: argparse.Namespace, command: str, device: torch.device) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine_line(device)}. Precision `{args.precision}`; random batches of {args.batch} real rows, "
        f"r_sample {R_SAMPLE}, r_token {R_TOKEN}; step time: the median of {args.steps} rounds after {args.warmup} "
        "warm-up rounds (one batch per round, the same for every mode, modes in random order); positions per real "
        "token over every round; memory: the first step on the first batch in a fresh process, above the level once "
        "the model, the batch and the optimizer are loaded.",
        "",
        "| model | data | length | fine-tuning | mode | positions / real token: scoring | training | step (s) "
        "| × padded | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (data, name, length, kind), r in results.items():
        if "medians" not in r:  # --layout-only
            continue
        m, mem = r["medians"], r["memory"]
        for mode in LAYOUT_MODES:
            scored, scored_real, trained, trained_real = r["positions"][mode]
            scoring = f"{scored / scored_real:.2f}" if scored_real else "–"
            lines.append(
                f"| {name} | {data} | {length} | {kind} | {mode} | {scoring} | {trained / max(trained_real, 1):.2f} "
                f"| {m[mode]:.2f} | {m[mode] / m[mode.split('+')[0]]:.2f} | {megabytes(mem[mode])} |"
            )
    lines += ["", f"The layout alone, a pass over all rows of {LAYOUT_BATCHES:,} random batches of {args.batch}:", ""]
    lines += [
        "| data | length | positions / real token: padded | packed | floor of any packing into rows of ≤ length |",
        "|---|---|---|---|---|",
    ]
    layouts = {(data, length): r["layout"] for (data, _, length, _), r in results.items()}
    for (data, length), ratio in layouts.items():
        lines.append(f"| {data} | {length} | {ratio['padded']:.2f} | {ratio['packed']:.3f} | {ratio['floor']:.3f} |")
    return "\n".join(lines) + "\n"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1])


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory above the level before ``fn`` while it runs: the CUDA allocator's peak, or on CPU the kernel's
    peak resident set (VmHWM, reset through /proc/self/clear_refs) in a process whose allocator returns large
    blocks to the system at once (see `memory_probe`)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) * 1024


def memory_probe(args: argparse.Namespace, name: str, lora: bool, length: int, mode: str, data: str = "") -> int:
    """Peak extra memory of one step of ``mode``, measured in a fresh process.

    On CPU the probe runs with MALLOC_MMAP_THRESHOLD_=65536, so freed tensors leave the resident set at once and
    memory kept by the allocator from earlier work cannot hide (or fake) a peak.
    """
    command = [sys.executable, "-m", "scripts.bench_step", "--probe", mode, "--model", f"{name}:{length}"]
    command += ["--batch", str(args.batch), "--windows", *map(str, args.windows)]
    command += ["--precision", args.precision, "--override", *args.override] + (["--lora"] if lora else [])
    command += ["--padding-free", data, "--sharegpt", args.sharegpt, "--rows", str(args.rows)] if data else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def probe(args: argparse.Namespace, device: torch.device) -> int:
    name, length = parse_model(args.model[0])
    if args.padding_free:
        layout_bench = LayoutBench(args, args.padding_free[0], name, args.lora, length, 1, device)
        return peak_extra_memory(lambda: layout_bench.step(args.probe, 0), device)
    bench = Bench(args, name, args.lora, length, device)
    return peak_extra_memory(lambda: bench.step(args.probe), device)


def step_times(bench: Bench, modes: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median time of each mode's step."""
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    order = random.Random(0)
    for i in range(args.warmup + args.steps):
        # Modes interleaved in a fresh random order each round, so a slow spell of the machine hits all of them.
        # Each timed step follows an untimed step of the same mode: a mode never pays for re-growing the memory
        # that the previous, smaller mode released (on CPU that cost is page faults, and it is not the mode's own).
        for mode in order.sample(modes, len(modes)):
            bench.step(mode)
            t = timed(lambda m=mode: bench.step(m), device)
            if i >= args.warmup:
                times[mode].append(t)
    return {mode: statistics.median(ts) for mode, ts in times.items()}


def measure(args: argparse.Namespace, name: str, lora: bool, length: int, device: torch.device) -> dict:
    modes = [*MODES, *window_modes(args.windows)]
    bench = Bench(args, name, lora, length, device)
    tokens = int(bench.batch["attention_mask"].sum())
    medians = step_times(bench, modes, args, device)
    trained = dict(bench.trained_positions)
    if not args.memory:
        memory = dict.fromkeys(modes)
    elif device.type == "cuda":  # the allocator's own peak: this process, a fresh optimizer state per mode
        memory = {}
        for mode in modes:
            bench.optimizer = bench.new_optimizer()
            torch.cuda.empty_cache()
            memory[mode] = peak_extra_memory(lambda m=mode: bench.step(m), device)
    else:
        bench = None  # the memory probes run in fresh processes: free this one's model first
        memory = {mode: memory_probe(args, name, lora, length, mode) for mode in modes}
    return {"medians": medians, "memory": memory, "tokens": tokens, "trained_positions": trained}


def megabytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f}"


def parse_model(spec: str) -> tuple[str, int]:
    name, _, length = spec.partition(":")
    return name, int(length or 256)


def machine_line(device: torch.device) -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, device `{device}`" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )


def report(results: dict, args: argparse.Namespace, command: str, device: torch.device) -> str:
    machine = machine_line(device)
    memory_kind = "`torch.cuda.max_memory_allocated`" if device.type == "cuda" else "peak resident set (VmHWM)"
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. Precision `{args.precision}`; batch {args.batch} rows of random tokens (lengths 3/4 to 1 "
        f"of the sequence length, a 64-token prompt), r_sample {R_SAMPLE}, r_token {R_TOKEN}; median of "
        f"{args.steps} steps after {args.warmup} warm-up rounds, modes interleaved in random order, each timed step "
        "right after an untimed step of the same mode. Memory: one step in a fresh process, above the level once the "
        f"model, the batch and the optimizer are loaded ({memory_kind}; AdamW's state is created in that step).",
        "",
        "| model | tokens | fine-tuning | mode | step (s) | × full | tokens/s | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, length, kind), r in results.items():
        m, mem = r["medians"], r["memory"]
        for mode in MODES:
            lines.append(
                f"| {name} | {args.batch} × {length} | {kind} | {mode} | {m[mode]:.3f} | {m[mode] / m['full']:.2f} "
                f"| {r['tokens'] / m[mode]:,.0f} | {megabytes(mem[mode])} |"
            )
    if args.windows:
        lines += [
            "",
            f"One optimizer step over A micro-batches of {args.batch} rows (lengths shuffled): `local` decides and "
            "trains each micro-batch on its own, `window` decides once over the window and re-packs the kept rows by "
            "length, `unpacked` decides once but trains each micro-batch's kept rows on their own. Trained positions: "
            "through the training forward and backward, padding included.",
            "",
            "| model | global batch | fine-tuning | mode | step (s) | × local | trained positions | peak memory (MB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (name, length, kind), r in results.items():
            m, mem = r["medians"], r["memory"]
            for mode in window_modes(args.windows):
                accumulate = mode.split("/")[1]
                lines.append(
                    f"| {name} | {accumulate} × {args.batch} × {length} | {kind} | {mode} | {m[mode]:.3f} "
                    f"| {m[mode] / m[f'local/{accumulate}']:.2f} | {r['trained_positions'][mode]:,} "
                    f"| {megabytes(mem[mode])} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["tiny_llama:256", "smollm2_135m:256"], help="NAME[:LENGTH]")
    parser.add_argument("--kinds", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--override", nargs="*", default=[], help="model overrides, e.g. model.tokenizer=DIR")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="times only (no memory probes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--write", type=Path, default=None, help="also write the Markdown table here")
    parser.add_argument(
        "--windows", nargs="*", type=int, default=[], help="also one step over A micro-batches, local against window"
    )
    parser.add_argument(
        "--padding-free", nargs="*", choices=["pairs", "chats"], default=[], help="padded against packed, real data"
    )
    parser.add_argument(
        "--sharegpt", default=SHAREGPT, help="ShareGPT conversations (.json or .jsonl) for --padding-free"
    )
    parser.add_argument("--rows", type=int, default=20_000, help="--padding-free: pairs or conversations read")
    parser.add_argument("--layout-only", action="store_true", help="--padding-free: count the layout, run no model")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: memory_probe, one mode
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.probe:
        print(probe(args, device))
        return
    results = {}
    command = "python -m scripts.bench_step " + " ".join(sys.argv[1:])
    for spec in args.model:
        name, length = parse_model(spec)
        for kind in args.kinds:
            for data in args.padding_free:
                print(f"padded against packed: {name} on {data} at {length} tokens ({kind}) ...", flush=True)
                results[(data, name, length, kind)] = measure_layouts(args, data, name, kind == "lora", length, device)
            if not args.padding_free:
                print(f"benchmarking {name} at {args.batch} x {length} ({kind}) ...", flush=True)
                results[(name, length, kind)] = measure(args, name, kind == "lora", length, device)
    text = (layout_report if args.padding_free else report)(results, args, command, device)
    print(text)
    if args.json:
        raw = {":".join(map(str, key)): r for key, r in results.items()}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)


if __name__ == "__main__":
    main()
