"""The causal LM and its tokenizer from the `model` config group: a random-init Llama of any shape, SmolLM2 from its
package, any HF directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from qtuning.data.tokenize import use_chat_template
from qtuning.errors import QTuningError
from qtuning.models.smollm2 import convert_smollm2
from qtuning.models.tiny import build_char_tokenizer, build_random_llama

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SOURCES = ("random", "smollm2", "hf")


def apply_lora(model: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: list[str]) -> Any:
    """Wrap ``model`` in a peft LoRA adapter; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def _check(cfg: Any) -> None:
    if cfg.source not in SOURCES:
        raise QTuningError(f"model.source={cfg.source!r} must be one of {', '.join(SOURCES)}")
    if cfg.dtype not in DTYPES:
        raise QTuningError(f"model.dtype={cfg.dtype!r} must be one of {', '.join(DTYPES)}")
    if cfg.source == "hf" and not cfg.name_or_path:
        raise QTuningError("model.name_or_path is required for model.source=hf")


def _pretrained_path(source: str, name_or_path: str | None, cache_dir: str, key: str = "model.name_or_path") -> str:
    if source == "smollm2":
        return str(convert_smollm2(Path(cache_dir).expanduser() / "smollm2-135m-instruct"))
    path = str(name_or_path)
    if not Path(path).expanduser().exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise QTuningError(f"{key}={path}: no such directory, and the hub is offline (HF_HUB_OFFLINE=1)")
    return path


def build_tokenizer(cfg: Any, cache_dir: str) -> PreTrainedTokenizerBase:
    """The tokenizer of the `model` config, with a pad token and the chosen chat template."""
    _check(cfg)
    key, source, path = "model.name_or_path", cfg.source, cfg.name_or_path
    if cfg.source == "random":  # a random-init model takes the tokenizer named by model.tokenizer
        key, path = "model.tokenizer", cfg.tokenizer
        source = path if path in ("char", "smollm2") else "hf"
    if source == "char":
        tokenizer = build_char_tokenizer()
    else:
        path = _pretrained_path(source, path, cache_dir, key)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(cfg.trust_remote_code))
        except OSError as err:
            raise QTuningError(f"{key}={path}: cannot load its tokenizer: {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_chat_template(tokenizer, cfg.chat_template)
    return tokenizer


def build_model(cfg: Any, cache_dir: str, vocab_size: int, seed: int = 0) -> Any:
    """The causal LM of the `model` config in its dtype, LoRA-wrapped if ``lora.enabled``."""
    _check(cfg)
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "random":
        architecture = {"vocab_size": vocab_size, **{k: v for k, v in cfg.architecture.items() if v is not None}}
        model = build_random_llama(seed=seed, **architecture).to(dtype)
    else:
        path = _pretrained_path(cfg.source, cfg.name_or_path, cache_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=bool(cfg.trust_remote_code)
            )
        except OSError as err:
            raise QTuningError(f"model.name_or_path={path}: cannot load the model: {err}") from None
    model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it is given
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora.enabled:
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        model = apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %s parameters, %s trainable", cfg.name, f"{total:,}", f"{trainable:,}")
    return model
