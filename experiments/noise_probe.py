"""Does Q-Tuning's triage drop harmful noise? Corrupt real ShareGPT pairs, score them, and count what each rule keeps.

    python -m experiments.noise_probe --write docs/noise_probe.md

1. A probe set of real single-turn ShareGPT pairs: ``--clean`` untouched, plus ``--per-kind`` corrupted copies of
   other pairs for each kind of damage real SFT data suffers from:
   - ``mismatched``: the response of another pair (a broken join or shuffled export);
   - ``typos``: a quarter of the response's words with a character dropped, doubled or swapped (OCR, scraping);
   - ``loop``: the response's first sentence repeated to its length (a degenerate generation loop).
2. Every sample scored once by the model (PPL and mean entropy, as in training).
3. The triage of each variant (fill-up rule × perplexity guard × entropy scope) run on random batches of
   B ∈ {8, 32, 64} at r_sample ∈ {0.125, 0.25, 0.5} (``--repeats`` random batchings), counting how often a sample
   of each kind is kept.
Reported: keep rates of clean and corrupted samples and the noise keep ratio (corrupted rate ÷ clean rate), the
window axis (micro-batches of 8 accumulated 1, 4 or 8 times: ``threshold_scope=local`` against ``window``), and the
EU plane coloured by kind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure
from tqdm import tqdm

from experiments.corrupt import loop, rotate, single_turn_pairs, typos
from qtuning.config import config_dir
from qtuning.data import SFTDataModule
from qtuning.models import build_model, build_tokenizer
from qtuning.ops.passes import scoring_forward
from qtuning.pruning.qtuning import FILL_UP_RULES, TriageSettings, triage

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("clean", "mismatched", "typos", "loop")
BATCH_SIZES = (8, 32, 64)
RATIOS = (0.125, 0.25, 0.5)
# (pruner.fill_up, pruner.ppl_guard): every fill-up rule alone, and the two that fill up with the guard
VARIANTS = [(rule, 0.0) for rule in FILL_UP_RULES] + [("minmax", 0.25), ("rank", 0.25)]
# The window axis: micro-batches of 8, accumulated A times per optimizer step, for the faithful and the robust rule
MICRO_BATCH, ACCUMULATIONS = 8, (1, 4, 8)
WINDOW_RULES = (("minmax", 0.0), ("rank", 0.25))
TARGET_SETTINGS = ((8, 0.25), (8, 0.5))  # where the issue asks for mismatched ≤ 0.5× clean, clean within 5 points
COLOURS = {"clean": "tab:gray", "mismatched": "tab:red", "typos": "tab:orange", "loop": "tab:blue"}


def build_probe_set(clean: int, per_kind: int, seed: int) -> list[dict]:
    """Clean pairs, then for each kind ``per_kind`` corrupted versions of further pairs (never the clean ones)."""
    rng = random.Random(seed)
    pairs = list(islice(single_turn_pairs(max_prompt_chars=300, max_response_chars=700), clean + 3 * per_kind))
    if len(pairs) < clean + 3 * per_kind:
        raise SystemExit(f"only {len(pairs)} usable ShareGPT pairs for {clean + 3 * per_kind}")
    rows = [{"prompt": p, "completion": r, "kind": "clean"} for p, r in pairs[:clean]]
    pool = pairs[clean:]
    for k, kind in enumerate(KINDS[1:]):
        chunk = pool[k * per_kind : (k + 1) * per_kind]
        others = rotate([response for _, response in chunk])  # a derangement within the chunk
        for (prompt, response), other in zip(chunk, others, strict=True):
            if kind == "mismatched":
                response = other
            elif kind == "typos":
                response = typos(response, rng)
            else:
                response = loop(response)
            rows.append({"prompt": prompt, "completion": response, "kind": kind})
    return rows


def score(
    rows: list[dict], model_name: str, max_length: int, batch_size: int, work_dir: Path
) -> dict[str, torch.Tensor]:
    """PPL and mean entropy (over non-pad positions, as the authors, and over the response) of every probe row."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model_name}"]).model
    cache = os.path.expanduser(os.environ.get("QTUNING_CACHE_DIR", "~/.cache/qtuning"))
    tokenizer = build_tokenizer(cfg, cache)
    model = build_model(cfg, cache, vocab_size=len(tokenizer)).eval()
    path = work_dir / "probe_set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = SFTDataModule(tokenizer, str(path), "prompt_completion", max_length=max_length, batch_size=batch_size)
    data.setup("predict")
    ppl, ent, ent_response, kinds = [], [], [], []
    for batch in tqdm(data.predict_dataloader(), desc="scoring", unit="batch"):
        stats = scoring_forward(model, batch)
        ppl.append(stats.sample_ppl())
        ent.append(stats.sample_entropy("nonpad"))
        ent_response.append(stats.sample_entropy("response"))
        for i in batch["sample_idx"].tolist():
            line = int(data.train_examples[i].location.rsplit(":", 1)[1])  # JSONL line = probe row + 1
            kinds.append(KINDS.index(rows[line - 1]["kind"]))
    return {
        "ppl": torch.cat(ppl),
        "entropy": torch.cat(ent),
        "entropy_response": torch.cat(ent_response),
        "kind": torch.tensor(kinds),
    }


def keep_rates(
    scores: dict, rule: str, guard: float, scope: str, batch_size: int, ratio: float, repeats: int, seed: int
) -> dict[str, float]:
    """Fraction of each kind's samples kept by the triage over ``repeats`` random batchings."""
    entropy = scores["entropy" if scope == "nonpad" else "entropy_response"]
    gen = torch.Generator().manual_seed(seed)
    kept, seen = torch.zeros(len(KINDS)), torch.zeros(len(KINDS))
    n = len(scores["kind"]) // batch_size * batch_size
    for _ in range(repeats):
        order = torch.randperm(len(scores["kind"]), generator=gen)[:n].view(-1, batch_size)
        for rows in order:
            result = triage(scores["ppl"][rows], entropy[rows], TriageSettings(ratio, fill_up=rule, ppl_guard=guard))
            kinds = scores["kind"][rows]
            seen += torch.bincount(kinds, minlength=len(KINDS))
            kept += torch.bincount(kinds[result.kept], minlength=len(KINDS))
    return {kind: float(kept[i] / seen[i]) for i, kind in enumerate(KINDS)}


def eu_plane_by_kind(scores: dict, path: Path) -> None:
    """Two panels, entropy over non-pad positions and over the response; colours by kind; dotted: medians."""
    fig = Figure(figsize=(11, 4.5), dpi=100)
    for ax, key, scope in zip(
        fig.subplots(1, 2), ("entropy", "entropy_response"), ("non-pad", "response"), strict=True
    ):
        for i, kind in enumerate(KINDS):
            sel = scores["kind"] == i
            label = f"{kind} ({int(sel.sum())})"
            ax.scatter(scores["ppl"][sel].log(), scores[key][sel], s=10, c=COLOURS[kind], label=label, alpha=0.7)
        ax.axvline(float(scores["ppl"].quantile(0.5).log()), color="black", lw=0.6, ls=":")
        ax.axhline(float(scores[key].quantile(0.5)), color="black", lw=0.6, ls=":")
        ax.set_xlabel("log perplexity (error)")
        ax.set_ylabel(f"mean entropy over {scope} positions, nats")
        ax.set_title(f"entropy_scope: {'nonpad' if key == 'entropy' else 'response'}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def ratio(rates: dict[str, float], kind: str) -> float:
    return rates[kind] / max(rates["clean"], 1e-9)


def meets_target(rates: dict, rule: str, guard: float, scope: str) -> bool:
    """Mismatched kept at ≤ 0.5× the clean rate, with clean within 5 points of r_sample, at every target setting."""
    return all(
        ratio(rates[b, r, rule, guard, scope], "mismatched") <= 0.5
        and abs(rates[b, r, rule, guard, scope]["clean"] - r) <= 0.05
        for b, r in TARGET_SETTINGS
    )


def verdict(rates: dict) -> list[str]:
    """A summary row per variant (mean noise keep ratio per kind over every B and r_sample) and the best variant:
    the one meeting the target with the lowest mean mismatched ratio at the target settings."""
    variants = sorted({key[2:] for key in rates}, key=lambda v: (VARIANTS.index(v[:2]), v[2]))
    lines = [
        "## Summary",
        "",
        "Mean noise keep ratio over the 9 settings (B × r_sample), and the target: at B = 8 and r_sample 0.25 and "
        "0.5, mismatched kept at ≤ 0.5× the clean rate while clean stays within 5 points of r_sample.",
        "",
        "| fill_up | ppl_guard | entropy_scope | mismatched | typos | loop | B=8 mismatched ratio (r .25 / .5) "
        "| B=8 clean kept (r .25 / .5) | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    passing = []
    for rule, guard, scope in variants:
        mine = [kr for key, kr in rates.items() if key[2:] == (rule, guard, scope)]
        means = [sum(ratio(kr, kind) for kr in mine) / len(mine) for kind in KINDS[1:]]
        at_target = [rates[b, r, rule, guard, scope] for b, r in TARGET_SETTINGS]
        ok = meets_target(rates, rule, guard, scope)
        if ok:
            passing.append((sum(ratio(kr, "mismatched") for kr in at_target), rule, guard, scope))
        lines.append(
            f"| {rule} | {guard} | {scope} | "
            + " | ".join(f"{m:.2f}" for m in means)
            + " | "
            + " / ".join(f"{ratio(kr, 'mismatched'):.2f}" for kr in at_target)
            + " | "
            + " / ".join(f"{kr['clean']:.1%}" for kr in at_target)
            + f" | {'met' if ok else '—'} |"
        )
    lines.append("")
    if passing:
        _, rule, guard, scope = min(passing)
        lines.append(
            f"**Best variant: `pruner.fill_up={rule} pruner.ppl_guard={guard}`** (with "
            f"`pruner.entropy_scope={scope}`): the lowest mismatched keep ratio at the target settings among the "
            "variants that meet the target."
        )
    else:
        lines.append("**No variant meets the target.**")
    return lines + [""]


def window_axis(rates: dict) -> list[str]:
    """``threshold_scope=local`` against ``window`` under gradient accumulation. The triage sees only the statistics
    of the samples it decides over, all scored by the same weights within an optimizer step: local decides on each
    micro-batch of 8 whatever the accumulation, window on the 8·A samples of the step, so each is a batching above
    (B = 8, or B = 8·A)."""
    lines = [
        "## Window: one decision per optimizer step",
        "",
        f"Micro-batches of {MICRO_BATCH} accumulated A times per optimizer step (effective batch {MICRO_BATCH}·A), "
        "entropy_scope nonpad: `local` triages each micro-batch on its own, `window` (`pruner.threshold_scope="
        "window`) the whole step; both are read off the batchings above (B = 8 and B = 8·A).",
        "",
        "| fill_up | ppl_guard | r_sample | A | effective batch | threshold_scope | clean kept "
        "| mismatched kept (ratio) | typos kept (ratio) | loop kept (ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rule, guard in WINDOW_RULES:
        for r in RATIOS:
            for accumulate in ACCUMULATIONS:
                # the samples each scope decides over; at A = 1 the two are one rule
                window = MICRO_BATCH * accumulate
                scopes = {"local": MICRO_BATCH, "window": window} if accumulate > 1 else {"either": MICRO_BATCH}
                for scope, decided in scopes.items():
                    kr = rates[decided, r, rule, guard, "nonpad"]
                    cells = [f"{kr[k]:.1%} ({ratio(kr, k):.2f})" for k in KINDS[1:]]
                    lines.append(
                        f"| {rule} | {guard} | {r} | {accumulate} | {window} | {scope} | {kr['clean']:.1%} | "
                        + " | ".join(cells)
                        + " |"
                    )
    return [
        *lines,
        "",
        "Reading. For the faithful rule the window changes what is kept more than how often: at r_sample "
        "0.125 mismatched responses fall from 1.18× the clean rate to 0.76× (A = 4) and 0.67× (A = 8), at "
        "0.25 they stay at about 1×, and at 0.5 they rise to 1.26× and 1.41×, while loops fall at every "
        "budget. For the noise-robust rule (`fill_up=rank ppl_guard=0.25`) the window lowers mismatched "
        "responses at every budget (0.31× → 0.20×, 0.30× → 0.19×, 0.27× → 0.17× at A = 8) and loops at the "
        "two small budgets (1.45× → 0.96×, 1.26× → 1.00×), not at 0.5 (1.65× → 1.71×). These are keep rates "
        "of the triage on fixed scores, not trained models.",
        "",
    ]


def report(scores: dict, rates: dict, args: argparse.Namespace, runtime: float, plot: Path) -> str:
    counts = {kind: int((scores["kind"] == i).sum()) for i, kind in enumerate(KINDS)}
    lines = [
        "# Noise probe: does the triage keep harmful noise?",
        "",
        f"Command: `python -m experiments.noise_probe {' '.join(sys.argv[1:])}` ({runtime / 60:.1f} min on this "
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}).",
        "",
        f"Probe set: {counts['clean']} real single-turn ShareGPT pairs as they are, plus corrupted copies of other "
        f"pairs: {counts['mismatched']} `mismatched` (the response of another pair), {counts['typos']} `typos` (a "
        f"quarter of the words with a character dropped, doubled or swapped) and {counts['loop']} `loop` (the first "
        f"sentence repeated to the response's length). Scored once by {args.model} (max_length {args.max_length}); "
        f"the triage of each variant then runs on {args.repeats} random batchings of the set. Keep rate = kept ÷ "
        "seen; noise keep ratio = a corrupted kind's keep rate ÷ the clean keep rate (1 = kept as often as clean).",
        "",
        "Variants: `fill_up` is the fill-up rule (`minmax` is the authors'); `ppl_guard` the fraction of each batch "
        "with the highest perplexity set aside before the triage (0, the authors': none); `entropy_scope` where the "
        "entropy is averaged (`nonpad`, the authors', or `response`).",
        "",
        f"![EU plane by kind]({plot.name})",
        "",
        *verdict(rates),
        "Reading. With `fill_up=none` the bands alone keep mismatched responses about as often as clean ones: a "
        "mismatched response has a high perplexity, and when its entropy is low for its batch it sits in the Q2 "
        "corner, the 'valuable misconception' the method wants to keep, so no fill-up rule can undo that. "
        "`ppl_guard` sets the ⌊g·B⌋ highest-perplexity samples of each batch aside before the triage, which then "
        "measures its bands among the rest. Its cost: clean samples that are merely hard are set aside too, and the "
        "freed budget goes to low-perplexity samples, so degenerate loops (the lowest perplexities) are kept more "
        "often than clean ones. The faithful rule (`minmax`, no guard) stays the default; the best variant is a "
        "switch, and the CPU mini-reproduction trains it as an extra row.",
        "",
        *window_axis(rates),
        "## All settings",
        "",
        "| B | r_sample | fill_up | ppl_guard | entropy_scope | clean kept | mismatched kept (ratio) "
        "| typos kept (ratio) | loop kept (ratio) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (b, r, rule, guard, scope), kr in rates.items():
        cells = [f"{kr[k]:.1%} ({ratio(kr, k):.2f})" for k in KINDS[1:]]
        lines.append(f"| {b} | {r} | {rule} | {guard} | {scope} | {kr['clean']:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--clean", type=int, default=400)
    parser.add_argument("--per-kind", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, default=None, help="write the Markdown report here (plot beside it)")
    parser.add_argument("--reuse-scores", action="store_true", help="reuse logs/noise_probe/scores.pt if present")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    work_dir = ROOT / "logs" / "noise_probe"  # the probe set and its scores
    work_dir.mkdir(parents=True, exist_ok=True)
    cached = work_dir / "scores.pt"
    if args.reuse_scores and cached.exists():
        scores = torch.load(cached)
    else:
        rows = build_probe_set(args.clean, args.per_kind, args.seed)
        scores = score(rows, args.model, args.max_length, 8, work_dir)
        torch.save(scores, cached)
    settings = [
        (b, r, rule, guard, scope)
        for b in BATCH_SIZES
        for r in RATIOS
        for rule, guard in VARIANTS
        for scope in ("nonpad", "response")
    ]
    rates = {
        (b, r, rule, guard, scope): keep_rates(scores, rule, guard, scope, b, r, args.repeats, args.seed)
        for b, r, rule, guard, scope in tqdm(settings, desc="triage", unit="setting")
    }
    plot = (args.write.parent if args.write else work_dir) / "noise_probe_eu_plane.png"
    eu_plane_by_kind(scores, plot)
    text = report(scores, rates, args, time.time() - started, plot)
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
