"""Evaluation on the paper's benchmarks through lm-eval-harness, offline: ``python -m qtuning.eval`` (conf/eval.yaml).

    python -m qtuning.eval model=smollm2_135m eval.tasks=[arc_easy,arc_challenge] eval.limit=100
    python -m qtuning.eval model=smollm2_135m checkpoint=logs/train/runs/<run>     # its trained LoRA adapter, merged
    python -m qtuning.eval model=hf model.name_or_path=/path/to/hf_model            # any Hugging Face model directory

`evaluate` runs the tasks on a model in memory; `train ... eval=paper_general` calls it at the end of training.
Task definitions and their local data: `qtuning.evaluation` (``eval.data_dir`` for sets that are not shipped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from qtuning.config import check_config, config_dir
from qtuning.errors import QTuningError, exit_on_bad_input, run_cli
from qtuning.evaluation.data import TASKS, check_tasks, metric_key, prepare_tasks
from qtuning.loggers import build_loggers, finish_wandb
from qtuning.models import build_model, build_tokenizer
from qtuning.ops.passes import base_model
from qtuning.outputs import write_atomic

log = logging.getLogger("qtuning.eval")


@contextlib.contextmanager
def merged_for_eval(model: torch.nn.Module, device: str | None = None) -> Iterator[torch.nn.Module]:
    """The plain causal LM in eval mode on ``device`` (None: where it is): a LoRA adapter merged into it for the
    duration (undone after, so training could go on), the previous mode and device restored."""
    was_training, previous = model.training, next(model.parameters()).device
    device = device or previous
    is_peft = hasattr(model, "merge_adapter")
    if is_peft:
        model.merge_adapter()
    model.eval().to(device)
    try:
        yield base_model(model)
    finally:
        if is_peft:
            model.unmerge_adapter()
        model.train(was_training).to(previous)


def flatten_results(results: dict[str, Any], names: list[str]) -> dict[str, float]:
    """lm-eval's ``results`` (``{task: {"acc,none": x, "acc_stderr,none": s, ...}}``) as ``{"arc_easy/acc": x,
    "arc_easy/acc_stderr": s, ...}`` for the user-facing task names."""
    flat: dict[str, float] = {}
    for name in names:
        for key, value in results[TASKS[name].task].items():
            metric, _, _filter = key.partition(",")
            if _filter and isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[metric_key(name, metric)] = float(value)
    return flat


def call_groups(
    names: list[str], limit: Any, limits: Any = None, chat_template: Any = False
) -> dict[tuple[Any, bool], list[str]]:
    """Tasks grouped by (document limit, chat template), since lm-eval takes one of each per call.

    ``limits`` maps a task to its own limit (else ``limit``); ``chat_template`` is a bool for every task or a list of
    the tasks whose prompts go through the tokenizer's chat template.
    """
    limits = dict(limits or {})
    chat = set(names) if chat_template is True else set(chat_template or [])
    unknown = chat - set(names)
    if unknown:
        raise QTuningError(f"eval.chat_template names {sorted(unknown)}, which are not in eval.tasks={names}")
    groups: dict[tuple[Any, bool], list[str]] = {}
    for name in names:
        groups.setdefault((limits.get(name, limit), name in chat), []).append(name)
    return groups


def check_eval(eval_cfg: DictConfig, cache_dir: str) -> None:
    """What `evaluate` would refuse, before any model loads and without writing anything (see `check_tasks`)."""
    names = list(eval_cfg.tasks)
    check_tasks(names, cache_dir, eval_cfg.get("data_dir"), eval_cfg.get("max_gen_toks"))
    call_groups(names, eval_cfg.limit, eval_cfg.get("limits"), eval_cfg.get("chat_template", False))


def evaluate(model: torch.nn.Module, tokenizer: Any, eval_cfg: DictConfig, cache_dir: str, work_dir: Path) -> dict:
    """Run ``eval_cfg.tasks`` through lm-eval on ``model``; metrics and their standard errors, flat."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = list(eval_cfg.tasks)
    include = prepare_tasks(
        names, work_dir / "lm_eval_tasks", cache_dir, eval_cfg.get("data_dir"), eval_cfg.get("max_gen_toks")
    )
    task_manager = TaskManager(include_path=str(include), include_defaults=False)  # 12 s saved: no built-ins
    groups = call_groups(names, eval_cfg.limit, eval_cfg.get("limits"), eval_cfg.get("chat_template", False))
    started = time.time()
    metrics: dict[str, float] = {}
    with merged_for_eval(model, eval_cfg.device) as plain:
        lm = HFLM(pretrained=plain, tokenizer=tokenizer, batch_size=eval_cfg.batch_size, max_length=eval_cfg.max_length)
        for (limit, chat), group in groups.items():
            output = simple_evaluate(
                model=lm,
                tasks=[TASKS[name].task for name in group],
                task_manager=task_manager,
                limit=limit,
                bootstrap_iters=eval_cfg.bootstrap_iters,
                log_samples=False,
                apply_chat_template=chat,
            )
            metrics.update(flatten_results(output["results"], group))
    metrics["eval/runtime_s"] = time.time() - started
    return metrics


def load_for_eval(cfg: DictConfig) -> tuple[torch.nn.Module, Any]:
    """``cfg.model``, with the trained weights of ``cfg.checkpoint`` (a train run's directory or its ``hf_model``):
    a LoRA adapter is loaded onto the base model (and merged by `evaluate`), a full model replaces it."""
    tokenizer = build_tokenizer(cfg.model, cfg.paths.cache_dir)
    checkpoint = cfg.get("checkpoint")
    if checkpoint is None:
        with_lora = OmegaConf.merge(cfg.model, {"lora": {"enabled": False}})  # an untrained adapter changes nothing
        return build_model(with_lora, cfg.paths.cache_dir, vocab_size=len(tokenizer), seed=cfg.seed), tokenizer
    path = Path(checkpoint).expanduser()
    path = path / "hf_model" if (path / "hf_model").is_dir() else path
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base_cfg = OmegaConf.merge(cfg.model, {"lora": {"enabled": False}})
        base = build_model(base_cfg, cfg.paths.cache_dir, vocab_size=len(tokenizer), seed=cfg.seed)
        return PeftModel.from_pretrained(base, str(path)), tokenizer
    if (path / "config.json").exists():
        full_cfg = OmegaConf.merge(cfg.model, {"source": "hf", "name_or_path": str(path), "lora": {"enabled": False}})
        return build_model(full_cfg, cfg.paths.cache_dir, vocab_size=len(tokenizer)), tokenizer
    raise QTuningError(f"checkpoint={checkpoint}: neither a LoRA adapter nor a model directory (no hf_model/ inside)")


def report(metrics: dict[str, float]) -> str:
    rows = [f"{key:32s} {value:.4f}" for key, value in sorted(metrics.items()) if not key.endswith("_stderr")]
    return "\n".join(rows)


def log_to_loggers(loggers: list[Any], metrics: dict[str, float], step: int = 0) -> None:
    """Task metrics as logged values and, for W&B, as run summary values (what its tables and reports show)."""
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "summary"):
            logger.experiment.summary.update(metrics)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@exit_on_bad_input
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_config(cfg)
    check_eval(cfg.eval, cfg.paths.cache_dir)  # unknown tasks or missing data fail before the model loads
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_for_eval(cfg)
    loggers = build_loggers(cfg)
    try:
        metrics = evaluate(model, tokenizer, cfg.eval, cfg.paths.cache_dir, output_dir)
        log_to_loggers(loggers, metrics)
    finally:
        finish_wandb(loggers)
    write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    log.info("results (%s):\n%s", output_dir / "metrics.json", report(metrics))


def cli() -> None:
    """The ``qtuning-eval`` command (``python -m qtuning.eval``)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
