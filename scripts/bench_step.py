"""What one optimizer step costs under each way of paying for Q-Tuning's scores, side by side in one process.

    python scripts/bench_step.py --model smollm2_135m --write docs/benchmarks.md

Compared on the same batch (8 x 256 tokens by default), r_sample 0.25, r_token 0.5, for full fine-tuning and LoRA:
- ``full``: full-data SFT (``pruner=none``), forward + backward over all rows;
- ``shared``: Q-Tuning as the authors ran it, one forward over all rows, pruning only masks the loss;
- ``separate``: Q-Tuning's default, a no-grad scoring pass (LM head in chunks), then forward + backward on kept rows;
- ``ideal``: a bare no-grad forward over all rows plus a plain step over the kept rows: the floor for ``separate``.
Median wall time over ``--steps`` steps after ``--warmup`` rounds; modes interleaved in random order, and each timed
step right after an untimed one of the same mode (steady state, not the cost of regrowing another mode's memory).
Then the scoring pass's peak memory against a plain no-grad forward of the same batch (which holds the full logits),
each in a fresh process: on CPU the kernel's peak resident set above the level before the call; on CUDA
``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from qtuning.models import build_model, build_tokenizer  # noqa: E402
from qtuning.module import SFTModule, scoring_forward, select_rows  # noqa: E402
from qtuning.pruning import NoPruning, QTuningPolicy, token_cross_entropy  # noqa: E402

R_SAMPLE, R_TOKEN = 0.25, 0.5


def model_config(name: str, lora: bool):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", f"model.lora.enabled={lora}"])
    return cfg.model, os.path.expanduser(os.environ.get("QTUNING_CACHE_DIR", "~/.cache/qtuning"))


def make_batch(vocab: int, batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens; a 64-token prompt; lengths spread over [3/4, 1] of ``length`` (right padding)."""
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    lengths = torch.linspace(length * 3 // 4, length, batch).long()
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :64] = -100
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
        "sample_idx": torch.arange(batch, device=device),
    }


def train_step(module: SFTModule, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    ce, weight, *_ = module.forward_kept(batch)
    ((ce * weight).sum() / weight.sum().clamp(min=1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ideal_step(module: SFTModule, optimizer: torch.optim.Optimizer, batch: dict, kept_rows: torch.Tensor) -> None:
    with torch.no_grad():
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    rows = select_rows(batch, kept_rows)
    logits = module.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    ce = token_cross_entropy(logits, rows["labels"], rows["attention_mask"])
    (ce.sum() / ce.ne(0).sum().clamp(min=1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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


def memory_probe(model_name: str, lora: bool, batch_size: int, length: int, what: str) -> int:
    """Peak extra memory of one scoring pass or one plain no-grad forward, measured in a fresh process.

    On CPU the probe runs with MALLOC_MMAP_THRESHOLD_=65536, so freed tensors leave the resident set at once and
    memory kept by the allocator from earlier work cannot hide (or fake) a peak.
    """
    if torch.cuda.is_available():
        return probe(model_name, lora, batch_size, length, what)
    command = [sys.executable, __file__, "--probe", what, "--model", model_name, "--batch", str(batch_size)]
    command += ["--length", str(length)] + (["--lora"] if lora else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def probe(model_name: str, lora: bool, batch_size: int, length: int, what: str) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, cache = model_config(model_name, lora)
    tokenizer = build_tokenizer(cfg, cache)
    model = build_model(cfg, cache, vocab_size=len(tokenizer)).to(device)
    batch = make_batch(len(tokenizer), batch_size, length, device)

    def plain_forward() -> object:
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    fn = plain_forward if what == "plain" else (lambda: scoring_forward(model, batch))
    fn()  # warm-up: lazily created state is not counted
    return peak_extra_memory(fn, device)


def bench(model_name: str, lora: bool, batch_size: int, length: int, steps: int, warmup: int, device) -> dict:
    cfg, cache = model_config(model_name, lora)
    tokenizer = build_tokenizer(cfg, cache)
    model = build_model(cfg, cache, vocab_size=len(tokenizer)).to(device)
    batch = make_batch(len(tokenizer), batch_size, length, device)
    modules = {
        "full": SFTModule(model, NoPruning(), optimizer=torch.optim.AdamW),
        "shared": SFTModule(model, QTuningPolicy(R_SAMPLE, R_TOKEN, scoring="shared"), optimizer=torch.optim.AdamW),
        "separate": SFTModule(model, QTuningPolicy(R_SAMPLE, R_TOKEN), optimizer=torch.optim.AdamW),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    decision = modules["separate"].policy.select(scoring_forward(model, batch))
    kept_rows = decision.sample_keep.nonzero().squeeze(1)
    runs: dict[str, Callable[[], None]] = {
        name: (lambda m=m: train_step(m, optimizer, batch)) for name, m in modules.items()
    }
    runs["ideal"] = lambda: ideal_step(modules["full"], optimizer, batch, kept_rows)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    order = random.Random(0)
    for i in range(warmup + steps):
        # Modes interleaved in a fresh random order each round, so a slow spell of the machine hits all of them.
        # Each timed step follows an untimed step of the same mode: a mode never pays for re-growing the memory
        # that the previous, smaller mode released (on CPU that cost is page faults, and it is not the mode's own).
        for name in order.sample(names, len(names)):
            runs[name]()
            t = timed(runs[name], device)
            if i >= warmup:
                times[name].append(t)
    medians = {name: statistics.median(ts) for name, ts in times.items()}

    memory = {
        "plain_forward": memory_probe(model_name, lora, batch_size, length, "plain"),
        "scoring_pass": memory_probe(model_name, lora, batch_size, length, "scoring"),
    }
    return {"medians": medians, "memory": memory, "kept": len(kept_rows)}


def report(results: dict, args: argparse.Namespace, command: str, device: torch.device) -> str:
    lines = [
        "# Benchmarks: the cost of one optimizer step",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device `{device}`"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
        + f". Batch {args.batch} x {args.length} tokens, r_sample {R_SAMPLE}, r_token {R_TOKEN}; "
        f"median of {args.steps} steps after {args.warmup} warm-up rounds; modes interleaved in random order, each "
        "timed step right after an untimed step of the same mode.",
        "",
        "`separate` is Q-Tuning's default (no-grad scoring pass, then forward + backward on the kept rows); `shared` "
        "is the authors' one full forward with a masked loss; `ideal` is a bare no-grad forward over all rows plus a "
        "plain step over the kept rows.",
        "",
        "| model | fine-tuning | kept rows | full (s) | shared | separate | ideal | separate / ideal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model_name, kind), r in results.items():
        m = r["medians"]
        lines.append(
            f"| {model_name} | {kind} | {r['kept']}/{args.batch} | {m['full']:.3f} | {m['shared'] / m['full']:.2f}x "
            f"| {m['separate'] / m['full']:.2f}x | {m['ideal'] / m['full']:.2f}x | {m['separate'] / m['ideal']:.2f} |"
        )
    lines += [
        "",
        "Peak memory of the scoring pass (backbone, then the LM head over chunks of non-pad positions, NLL and "
        "entropy in fp32) against a plain no-grad forward that returns the full logits, each in a fresh process after "
        "one warm-up call. On CPU: the kernel's peak resident set (VmHWM, reset before the call) above the resident "
        "set before it, with glibc returning blocks over 64 KiB to the system on free (MALLOC_MMAP_THRESHOLD_).",
        "",
        "| model | fine-tuning | plain forward (MB) | scoring pass (MB) | ratio |",
        "|---|---|---|---|---|",
    ]
    for (model_name, kind), r in results.items():
        plain, scoring = r["memory"]["plain_forward"], r["memory"]["scoring_pass"]
        lines.append(
            f"| {model_name} | {kind} | {plain / 2**20:.0f} | {scoring / 2**20:.0f} | {scoring / max(plain, 1):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["tiny_llama", "smollm2_135m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None, help="also write the Markdown report here")
    parser.add_argument("--probe", choices=["plain", "scoring"], help=argparse.SUPPRESS)  # internal: memory_probe
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.probe:
        print(probe(args.model[0], args.lora, args.batch, args.length, args.probe))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for model_name in args.model:
        for kind, lora in (("full", False), ("LoRA", True)):
            print(f"benchmarking {model_name} ({kind}) ...", flush=True)
            results[(model_name, kind)] = bench(
                model_name, lora, args.batch, args.length, args.steps, args.warmup, device
            )
    command = "python scripts/bench_step.py " + " ".join(sys.argv[1:])
    text = report(results, args, command, device)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)


if __name__ == "__main__":
    main()
