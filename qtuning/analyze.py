"""Score a dataset with a model and place every sample on the Error–Uncertainty plane, without training.

    python -m qtuning.analyze                                  # SmolLM2-135M on 256 ShareGPT chats, Q-Tuning s25_t50
    python -m qtuning.analyze data=file data.path=my.jsonl data.format=alpaca budget=s50_t70

Batches of ``data.batch_size`` rows in file order go through the scoring pass and the pruner, exactly as one training
step would see them. Writes to the output directory:
- ``eu_plane.png``: log-PPL × entropy of every sample, coloured by quadrant (batch medians), kept vs dropped;
- ``samples.csv``: sample_idx, location, ppl, entropy, quadrant, kept;
- ``pruned.jsonl``: the kept samples with their pruned labels (−100 on dropped tokens), a static pruning export.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from qtuning import IGNORE_INDEX
from qtuning.config import check_config, config_dir, instantiate_key
from qtuning.dashboard import QUADRANTS, eu_plane_figure
from qtuning.errors import QTuningError, exit_on_bad_input, run_cli
from qtuning.models import build_model, build_tokenizer
from qtuning.ops.passes import scoring_forward
from qtuning.outputs import write_atomic
from qtuning.pruning import PruningPolicy

log = logging.getLogger("qtuning.analyze")


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.data`` with ``cfg.model`` under ``cfg.pruner``; write the three outputs; return a summary."""
    check_config(cfg)
    L.seed_everything(cfg.seed)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg.model, cfg.paths.cache_dir)
    datamodule = instantiate_key(cfg.data, "data", tokenizer=tokenizer)
    datamodule.setup("predict")
    policy: PruningPolicy = instantiate_key(cfg.pruner, "pruner")
    if not policy.needs_scores:
        raise QTuningError(f"pruner={type(policy).__name__} does not score samples; use pruner=qtuning")
    model = build_model(cfg.model, cfg.paths.cache_dir, vocab_size=len(tokenizer), seed=cfg.seed).eval()

    samples, pruned_rows, decided_in = [], [], []  # decided_in: the batch each sample was decided in
    for number, batch in enumerate(tqdm(datamodule.predict_dataloader(cfg.num_samples), desc="scoring", unit="batch")):
        stats = policy.enrich(model, batch, scoring_forward(model, batch))
        decision = policy.select(stats)
        if decision.ppl is None:
            raise QTuningError(f"pruner={type(policy).__name__} places no sample on the EU plane; use pruner=qtuning")
        ppl, ent = decision.ppl, decision.entropy  # the EU coordinates the decision was made from
        decided_in += [number] * stats.batch_size
        for row in range(stats.batch_size):
            index = int(batch["sample_idx"][row])
            kept = bool(decision.sample_keep[row])
            samples.append(
                {
                    "sample_idx": index,
                    "location": datamodule.train_examples[index].location,
                    "ppl": float(ppl[row]),
                    "entropy": float(ent[row]),
                    "quadrant": int(decision.quadrant[row]) if decision.quadrant is not None else 0,
                    "kept": kept,
                }
            )
            if kept:
                length = int(batch["attention_mask"][row].sum())
                labels = batch["labels"][row, :length].clone()
                counts = torch.zeros(length, dtype=torch.bool)
                counts[1:] = decision.token_keep[row, : length - 1] & stats.response_mask[row, : length - 1]
                labels[~counts] = IGNORE_INDEX
                pruned_rows.append(
                    {
                        "sample_idx": index,
                        "location": samples[-1]["location"],
                        "input_ids": batch["input_ids"][row, :length].tolist(),
                        "labels": labels.tolist(),
                    }
                )

    fig = eu_plane_figure(
        torch.tensor([s["ppl"] for s in samples]),
        torch.tensor([s["entropy"] for s in samples]),
        torch.tensor([s["quadrant"] for s in samples]),
        torch.tensor([s["kept"] for s in samples]),
        title=f"{cfg.model.name}: {len(samples)} samples, each decided (quadrant, kept) in its batch of "
        f"{cfg.data.batch_size}",
        batch=torch.tensor(decided_in),
    )
    fig.savefig(output_dir / "eu_plane.png")
    with open(output_dir / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)
    write_atomic(output_dir / "pruned.jsonl", "".join(json.dumps(r) + "\n" for r in pruned_rows))

    populations = Counter(s["quadrant"] for s in samples)
    kept_by_quadrant = Counter(s["quadrant"] for s in samples if s["kept"])
    summary = {
        "samples": len(samples),
        "kept": sum(s["kept"] for s in samples),
        "quadrants": {QUADRANTS[k][0]: populations.get(k, 0) for k in QUADRANTS},
        "kept_by_quadrant": {QUADRANTS[k][0]: kept_by_quadrant.get(k, 0) for k in QUADRANTS},
        "output_dir": str(output_dir),
    }
    return summary


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="analyze")
@exit_on_bad_input
def main(cfg: DictConfig) -> None:
    summary = analyze(cfg)
    n = summary["samples"]
    print(f"\n{n} samples, {summary['kept']} kept ({summary['kept'] / n:.0%}); by quadrant (batch medians):")
    for name, count in summary["quadrants"].items():
        print(f"  {name:<20} {count:5d} ({count / n:4.0%}), kept {summary['kept_by_quadrant'][name]}")
    print(f"outputs: {summary['output_dir']} (eu_plane.png, samples.csv, pruned.jsonl)")


def cli() -> None:
    """The ``qtuning-analyze`` command (``python -m qtuning.analyze``)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
