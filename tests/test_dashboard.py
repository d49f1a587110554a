"""The Q-Tuning dashboard: W&B gets the per-step scalars, the EU-plane image, its table and pruned examples as HTML;
CSV runs keep the scalars and skip the media."""

from __future__ import annotations

import csv
from collections import Counter

import torch

from qtuning.dashboard import eu_plane_figure, figure_image, pruned_example_html
from qtuning.loggers import offline_history_keys, read_offline_run
from qtuning.train import train

DASHBOARD_KEYS = {
    "prune/q1", "prune/q2", "prune/q3", "prune/q4", "prune/q1_frac", "prune/q4_frac", "prune/kept_samples",
    "prune/kept_tokens", "prune/band_q", "prune/filled", "prune/fwd_tokens", "prune/bwd_tokens",
}  # fmt: skip


def test_wandb_run_gets_scalars_images_tables_and_html(tiny_cfg, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_cfg(
        "pruner=qtuning", "budget=s50_t70", "data.batch_size=8", "trainer.max_steps=2", "logger=wandb",
        "callbacks=default", "callbacks.dashboard.plot_every_n_steps=1",
    )  # fmt: skip
    train(cfg)
    wandb.teardown()  # wandb-core may close (flush) the run file after finish() returns; teardown waits for it
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    run_file = next(run_dir.glob("run-*.wandb"))
    keys = offline_history_keys(run_file)
    records = Counter(r.WhichOneof("record_type") for r in read_offline_run(run_file))
    assert DASHBOARD_KEYS <= keys, f"{run_file}: {run_file.stat().st_size} bytes, records {dict(records)}"
    assert {"prune/eu_plane", "prune/eu_points", "prune/pruned_examples"} <= keys
    media = run_dir / "files" / "media"
    assert len(list(media.glob("images/prune/eu_plane_*.png"))) == 2
    assert len(list(media.glob("table/prune/eu_points_*.table.json"))) == 2
    html_files = list(media.glob("html/prune/pruned_examples_*.html"))
    assert html_files and "<s " in html_files[0].read_text()


def test_csv_run_keeps_the_scalars(tiny_cfg, tmp_path):
    cfg = tiny_cfg("pruner=qtuning", "budget=s50_t70", "trainer.max_steps=2", "logger=csv", "callbacks=default")
    train(cfg)
    with open(next(tmp_path.glob("csv/*/metrics.csv"))) as f:
        header = next(csv.reader(f))
    assert DASHBOARD_KEYS <= set(header)


def test_eu_plane_figure_and_example_html(char_tokenizer):
    fig = eu_plane_figure(
        torch.tensor([2.0, 8, 3, 9]), torch.tensor([1.0, 2, 3, 0.5]), torch.tensor([3, 1, 4, 2]),
        torch.tensor([False, False, True, True]),
    )  # fmt: skip
    assert figure_image(fig).size == (550, 450)
    ids = torch.tensor(char_tokenizer("ab<c", add_special_tokens=False)["input_ids"])
    response = torch.tensor([False, True, True])  # position i is token i + 1: "b" prompt, "<" and "c" response
    dropped = torch.tensor([False, True, False])
    assert pruned_example_html(char_tokenizer, ids, response, dropped) == (
        '<pre style="white-space:pre-wrap;font-size:12px"><span style="color:#999">ab</span>'
        '<s style="color:#c0392b">&lt;</s>c</pre>'
    )
