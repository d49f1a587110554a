"""Training entry point: ``python -m qtuning.train [group=option ...] [key=value ...]`` (Hydra, ``conf/train.yaml``).

`train(cfg)` does the work and returns ``(metrics, objects)`` so that tests and sweeps can call it directly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from qtuning.config import check_config, config_dir, instantiate_key, optimizer_factory
from qtuning.data.plan import EpochPlanner
from qtuning.errors import QTuningError, exit_on_bad_input, run_cli
from qtuning.eval import check_eval, evaluate, log_to_loggers
from qtuning.loggers import build_loggers, describe_wandb, finish_wandb
from qtuning.models import build_model, build_tokenizer
from qtuning.module import SFTModule, StepScope
from qtuning.ops import Layout
from qtuning.outputs import save_hf_model, write_atomic
from qtuning.pruning import PruningPolicy
from qtuning.resume import SaveOnInterrupt, check_checkpoint, resolve_resume
from qtuning.sharding import FSDP2Strategy, full_state_dict, is_sharded

log = logging.getLogger("qtuning.train")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` under ``cfg.pruner``; returns (metrics, built objects)."""
    started = time.time()
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = output_dir / "checkpoints"
    resume_from = resolve_resume(cfg.get("resume"), checkpoint_dir)
    if resume_from:
        check_checkpoint(resume_from)  # a damaged file fails now, not after the data and the model are loaded
    if cfg.get("eval"):  # unknown tasks or missing evaluation data fail now, not after training
        if OmegaConf.select(cfg, "trainer.strategy._target_") == f"{FSDP2Strategy.__module__}.FSDP2Strategy":
            raise QTuningError(
                "eval under trainer=fsdp2: rank 0 alone cannot run a sharded model; set eval=null and evaluate "
                "hf_model/ afterwards with python -m qtuning.eval checkpoint=<run dir>"
            )
        check_eval(cfg.eval, cfg.paths.cache_dir)

    tokenizer = build_tokenizer(cfg.model, cfg.paths.cache_dir)
    datamodule = instantiate_key(cfg.data, "data", tokenizer=tokenizer)
    datamodule.setup("fit")  # read and tokenise now: bad data fails before the model is loaded
    policy: PruningPolicy = instantiate_key(cfg.pruner, "pruner")
    model = build_model(cfg.model, cfg.paths.cache_dir, vocab_size=len(tokenizer), seed=cfg.seed)
    # Over which rows one decision is made: set here, once, for the data (rows per training batch), the module and
    # the Trainer. A window of several micro-batches is trained, accumulated and clipped by the module itself.
    scope = StepScope(policy.threshold_scope, cfg.data.batch_size, cfg.trainer.accumulate_grad_batches)
    module_steps = {"accumulate_grad_batches": 1, "gradient_clip_val": None} if scope.manual else {}
    # data.val_size 0: Lightning skips validation instead of warning about an empty loader
    no_validation = {} if datamodule.val_examples else {"limit_val_batches": 0}
    module = SFTModule(
        model,
        policy,
        optimizer=optimizer_factory(cfg),
        scheduler=instantiate_key(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        max_bad_steps=cfg.max_bad_steps,
        scope=scope,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val") if scope.manual else None,
        layout=Layout(
            packed=bool(datamodule.padding_free),  # true or auto
            capacity=datamodule.source.max_length,
            required=datamodule.padding_free is True,
        ),
    )
    callbacks = [policy, *(instantiate_key(c, f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items())]
    callbacks.append(SaveOnInterrupt(str(checkpoint_dir)))
    datamodule.connect(policy if isinstance(policy, EpochPlanner) else None, window=scope.window)
    loggers = build_loggers(cfg)
    try:
        # Every epoch gets its own loader, which splits the data across processes itself (EpochSampler).
        trainer: L.Trainer = instantiate_key(
            cfg.trainer,
            "trainer",
            callbacks=callbacks,
            logger=loggers or False,
            reload_dataloaders_every_n_epochs=1,
            use_distributed_sampler=False,
            **module_steps,
            **no_validation,
        )
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        metrics = fit_and_validate(cfg, trainer, module, datamodule, resume_from)
        if cfg.get("eval") and trainer.is_global_zero:
            task_metrics = evaluate(model, tokenizer, cfg.eval, cfg.paths.cache_dir, output_dir)
            log_to_loggers(loggers, task_metrics, step=trainer.global_step)
            metrics.update(task_metrics)
        wandb_note = describe_wandb(loggers)
    finally:
        finish_wandb(loggers)  # one W&B run per job, also when a multirun runs its jobs in one process
    metrics["runtime_s"] = time.time() - started

    # sharded weights (trainer=fsdp2) are gathered by every process, for rank 0 to write
    full_weights = full_state_dict(model) if cfg.save_model and is_sharded(model) else None
    if trainer.is_global_zero:
        if cfg.save_model:
            save_hf_model(model, tokenizer, output_dir / "hf_model", full_weights)
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
    cfg: DictConfig,
    trainer: L.Trainer,
    module: SFTModule,
    datamodule: L.LightningDataModule,
    resume_from: str | None = None,
) -> dict[str, float]:
    """Validate (step 0, unless resuming), fit, validate again; the metrics of both ends."""
    metrics: dict[str, float] = {}
    has_val = len(datamodule.val_examples) > 0
    if has_val and cfg.validate_before_fit and resume_from is None:
        metrics["val/loss_start"] = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
    metrics.update(module.token_totals)
    if has_val:
        end = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        metrics.update({"val/loss": end["val/loss"], "val/ppl": end["val/ppl"]})
    metrics["trainer/global_step"] = trainer.global_step
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
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


def cli() -> None:
    """The ``qtuning-train`` command (``python -m qtuning.train``)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
