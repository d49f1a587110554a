"""W&B pictures of what the pruning policy did: the EU-plane scatter, its points as a table, and pruned examples.

Scalars (`prune/*`) are logged by the module for every logger; this callback adds the media, only for W&B runs
and only for policies that place samples on the plane (their `PruneDecision.quadrant` is set).
"""

from __future__ import annotations

import html
import io
import textwrap
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from qtuning.pruning import BatchStats, PruneDecision

QUADRANTS = {
    1: ("Q1 harmful noise", "tab:red"),
    2: ("Q2 misconception", "tab:orange"),
    3: ("Q3 redundant", "tab:gray"),
    4: ("Q4 calibration", "tab:blue"),
}


def eu_plane_figure(
    ppl: Tensor, ent: Tensor, quadrant: Tensor, kept: Tensor, title: str = "", batch: Tensor | None = None
) -> Figure:
    """log-PPL × entropy, coloured by quadrant; kept samples filled circles, dropped ones crosses; the dotted lines
    are the medians the quadrants were drawn by.

    ``batch`` ``[N]``: the decision each point belongs to, when the points come from several. Each is then placed
    relative to its own decision's medians (log PPL and entropy less theirs), so that the lines at 0 are what decided
    every point's quadrant.
    """
    fig = Figure(figsize=(5.5, 4.5), dpi=100)  # no pyplot: no global figure state, no display needed
    ax = fig.subplots()
    x, y = ppl.log(), ent.clone()
    if batch is None:
        x_line, y_line = float(torch.quantile(x, 0.5)), float(torch.quantile(y, 0.5))
        xlabel, ylabel, lines = "log perplexity (error)", "mean entropy, nats (uncertainty)", "the batch's medians"
    else:
        for b in batch.unique():
            members = batch == b
            x[members] -= torch.quantile(x[members], 0.5)
            y[members] -= torch.quantile(y[members], 0.5)
        x_line = y_line = 0.0
        xlabel, ylabel = "log perplexity − its batch's median", "mean entropy − its batch's median (nats)"
        lines = "each sample's own batch median"
    for k, (name, colour) in QUADRANTS.items():
        for is_kept, marker in ((True, "o"), (False, "x")):
            sel = (quadrant == k) & (kept == is_kept)
            if sel.any():
                label = f"{name} ({'kept' if is_kept else 'dropped'})"
                ax.scatter(x[sel], y[sel], c=colour, marker=marker, s=36, label=label)
    ax.axvline(x_line, color="black", lw=0.6, ls=":", label=f"quadrant lines: {lines}")
    ax.axhline(y_line, color="black", lw=0.6, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 60), fontsize=10)  # wrapped: a long title is not cut at the figure's edges
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def figure_image(fig: Figure) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer)


def pruned_example_html(tokenizer: Any, input_ids: Tensor, response: Tensor, dropped: Tensor) -> str:
    """One sample as HTML: prompt grey, kept response tokens plain, dropped ones struck through in red.

    ``response``/``dropped`` are ``[T-1]`` masks over targets, so token ``j`` is position ``j - 1``.
    """
    styles = {
        "prompt": '<span style="color:#999">{}</span>',
        "kept": "{}",
        "dropped": '<s style="color:#c0392b">{}</s>',
    }
    runs: list[tuple[str, str]] = []  # (kind, text), consecutive tokens of one kind merged
    for j, token_id in enumerate(input_ids.tolist()):
        in_response = j > 0 and bool(response[j - 1])
        kind = ("dropped" if bool(dropped[j - 1]) else "kept") if in_response else "prompt"
        text = tokenizer.decode([token_id])
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + text)
        else:
            runs.append((kind, text))
    body = "".join(styles[kind].format(html.escape(text)) for kind, text in runs)
    return f'<pre style="white-space:pre-wrap;font-size:12px">{body}</pre>'


class EUPlaneDashboard(Callback):
    """Every ``plot_every_n_steps`` optimizer steps: ``prune/eu_plane`` (image), ``prune/eu_points`` (table) and
    ``prune/pruned_examples`` (HTML of ``n_examples`` token-pruned samples)."""

    def __init__(self, plot_every_n_steps: int = 10, n_examples: int = 2) -> None:
        if plot_every_n_steps < 1:
            raise ValueError(f"plot_every_n_steps={plot_every_n_steps} must be at least 1")
        self.plot_every_n_steps = plot_every_n_steps
        self.n_examples = n_examples
        self._last_plotted_step = -1

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """``outputs`` is what the training step made (`SFTModule.training_step`): its statistics and decision."""
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        step = trainer.global_step
        if not loggers or not outputs or outputs["decision"].quadrant is None or not trainer.is_global_zero:
            return
        if step % self.plot_every_n_steps != 0 or step == self._last_plotted_step:
            return
        self._last_plotted_step = step
        import wandb

        logger = loggers[0]
        stats, decision = outputs["stats"], outputs["decision"]
        ppl, ent = decision.ppl.cpu(), decision.entropy.cpu()  # the EU coordinates the decision was made from
        quadrant, kept = decision.quadrant.cpu(), decision.sample_keep.cpu()
        fig = eu_plane_figure(ppl, ent, quadrant, kept, title=f"EU plane, step {step}")
        logger.log_image(key="prune/eu_plane", images=[figure_image(fig)], step=step)
        sample_idx = stats.sample_idx.tolist() if stats.sample_idx is not None else list(range(len(ppl)))
        rows = [
            [i, float(p), float(e), int(q), bool(k)]
            for i, p, e, q, k in zip(sample_idx, ppl, ent, quadrant, kept, strict=True)
        ]
        logger.log_table(
            key="prune/eu_points", columns=["sample_idx", "ppl", "entropy", "quadrant", "kept"], data=rows, step=step
        )
        examples = self.examples_html(trainer, batch, stats, decision)
        if examples:
            logger.log_metrics({"prune/pruned_examples": wandb.Html(examples)}, step=step)

    def examples_html(self, trainer: Trainer, batch: dict, stats: BatchStats, decision: PruneDecision) -> str:
        """The kept samples that lost the most response tokens (Q2 and Q2-like ones), rendered one after another."""
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            return ""
        dropped = stats.response_mask & decision.sample_keep[:, None] & ~decision.token_keep  # [B, T-1]
        n_dropped = dropped.sum(1)  # [B]
        rows = [int(r) for r in torch.argsort(n_dropped, descending=True, stable=True) if n_dropped[r] > 0]
        blocks = []
        for row in rows[: self.n_examples]:
            kept_frac = 1 - float(n_dropped[row]) / max(1, int(stats.response_mask[row].sum()))
            body = pruned_example_html(tokenizer, batch["input_ids"][row], stats.response_mask[row], dropped[row])
            blocks.append(f"<h4>sample {int(batch['sample_idx'][row])}: {kept_frac:.0%} of response kept</h4>{body}")
        return "\n".join(blocks)
