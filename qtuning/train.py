"""Training entry point: ``python -m qtuning.train [group=option ...] [key=value ...]`` (Hydra, ``conf/train.yaml``).

`train(cfg)` does the work and returns ``(metrics, objects)`` so that tests and sweeps can call it directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import wandb
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qtuning.errors import QTuningError, exit_on_bad_input
from qtuning.loggers import build_loggers, describe_wandb
from qtuning.models import build_model, build_tokenizer
from qtuning.module import SFTModule
from qtuning.pruning import PruningPolicy

log = logging.getLogger("qtuning.train")

MAX_DIRNAME = 120


def short_dirname(name: str) -> str:
    """A sweep job's directory name: its overrides, cut with a hash suffix when too long for a file name."""
    name = name.replace("/", "_") or "default"
    if len(name) <= MAX_DIRNAME:
        return name
    return f"{name[: MAX_DIRNAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("short_dirname", short_dirname, replace=True)


def check_config(cfg: DictConfig) -> None:
    """Checks that need no model or data, so that a typo fails in a second, naming the key."""
    for key in ("r_sample", "r_token"):
        value = cfg.budget.get(key)
        if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise QTuningError(f"budget.{key}={value} must be a number in (0, 1]")


def _instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Hydra's instantiate, with a constructor's ValueError reported against the config key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise QTuningError(f"{key}: {cause}") from None
        raise


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` under ``cfg.pruner``; returns (metrics, built objects)."""
    started = time.time()
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(cfg.model, cfg.paths.cache_dir)
    datamodule = _instantiate(cfg.data, "data", tokenizer=tokenizer)
    datamodule.setup("fit")  # read and tokenise now: bad data fails before the model is loaded
    policy: PruningPolicy = _instantiate(cfg.pruner, "pruner")
    model = build_model(cfg.model, cfg.paths.cache_dir, vocab_size=len(tokenizer), seed=cfg.seed)
    module = SFTModule(
        model,
        policy,
        optimizer=_instantiate(cfg.optimizer, "optimizer"),
        scheduler=_instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
    )
    callbacks = [policy, *(_instantiate(c, f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items())]
    loggers = build_loggers(cfg)
    try:
        trainer: L.Trainer = _instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        metrics = fit_and_validate(cfg, trainer, module, datamodule)
        wandb_note = describe_wandb(loggers)
    finally:
        wandb.finish()  # one W&B run per job, also when a multirun runs its jobs in one process
    metrics["runtime_s"] = time.time() - started

    if trainer.is_global_zero:
        if cfg.save_model:
            save_hf_model(model, tokenizer, output_dir / "hf_model")
        write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    objects = {
        "cfg": cfg,
        "datamodule": datamodule,
        "module": module,
        "policy": policy,
        "trainer": trainer,
        "loggers": loggers,
        "wandb_note": wandb_note,
    }
    return metrics, objects


def fit_and_validate(
    cfg: DictConfig, trainer: L.Trainer, module: SFTModule, datamodule: L.LightningDataModule
) -> dict[str, float]:
    """Validate (step 0), fit, validate again; the metrics of both ends."""
    metrics: dict[str, float] = {}
    has_val = len(datamodule.val_examples) > 0
    if has_val and cfg.validate_before_fit:
        metrics["val/loss_start"] = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
    if has_val:
        end = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        metrics.update({"val/loss": end["val/loss"], "val/ppl": end["val/ppl"]})
    metrics["trainer/global_step"] = trainer.global_step
    return metrics


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a killed run never leaves a truncated file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def save_hf_model(model: Any, tokenizer: Any, target: Path) -> None:
    """``save_pretrained`` into a staging directory, then move it into place."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@exit_on_bad_input
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    metrics, objects = train(cfg)
    start = metrics.get("val/loss_start")
    if "val/loss" in metrics:
        log.info(
            "validation loss: %s -> %.4f (ppl %.2f)",
            f"{start:.4f}" if start is not None else "n/a",
            metrics["val/loss"],
            metrics["val/ppl"],
        )
    log.info("outputs: %s (metrics.json, checkpoints/, hf_model/)", cfg.paths.output_dir)
    if objects["wandb_note"]:
        log.info(objects["wandb_note"])
    return metrics.get(cfg.get("optimized_metric") or "val/loss")


if __name__ == "__main__":
    main()
