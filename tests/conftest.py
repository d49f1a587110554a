"""Shared fixtures: offline environment, the character tokenizer, and the composed training config (tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
FIXTURES = ROOT / "tests" / "fixtures"
TINY_DATA = FIXTURES / "tiny_sft.jsonl"

# Tiny runs: the fixture data, no logger or checkpoint callback unless a test asks for one.
TINY_OVERRIDES = [
    "model=tiny_llama",
    "data=file",
    f"data.path={TINY_DATA}",
    "data.format=prompt_completion",
    "data.val_size=8",
    "data.batch_size=4",
    "data.max_length=64",
    "logger=none",
    "callbacks=none",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "save_model=false",
]

os.environ.update(OFFLINE_ENV)


def full_logits_cross_entropy(logits, labels, attention_mask):
    """The plain reference for `token_losses`: ``[B, T-1]`` fp32 cross-entropy from full ``[B, T, V]`` logits, 0
    outside the response."""
    import torch.nn.functional as F

    from qtuning.ops import shift_targets

    targets, response_mask, _ = shift_targets(labels, attention_mask)
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    return ce.view_as(targets) * response_mask


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def char_tokenizer():
    from qtuning.models import build_char_tokenizer

    return build_char_tokenizer()


def compose_train(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """``conf/<config_name>.yaml`` composed with overrides, its Hydra node set so ``${hydra:...}`` resolves."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = os.environ.get("QTUNING_CACHE_DIR", "~/.cache/qtuning")
        del cfg.hydra
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    """A factory: ``tiny_cfg("pruner=random", ...)`` gives a composed tiny-model config writing into tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return compose_train([*TINY_OVERRIDES, *overrides], tmp_path)

    yield make
    GlobalHydra.instance().clear()


def add_callbacks(mp: pytest.MonkeyPatch, *callbacks: object) -> None:
    """Make `qtuning.train.train` give its Trainer these extra callbacks (observers for a test)."""
    import qtuning.train as train_module

    original = train_module.instantiate_key

    def with_callbacks(node, key, **kwargs):
        if key == "trainer":
            kwargs["callbacks"] = [*kwargs["callbacks"], *callbacks]
        return original(node, key, **kwargs)

    mp.setattr(train_module, "instantiate_key", with_callbacks)


def run_cli(*args: str, module: str = "qtuning.train", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def run_cli_cases(cases: list[tuple[str, list[str]]]) -> list[subprocess.CompletedProcess]:
    """Each ``(module, args)`` as ``python -m <module> <args>`` would run it, all from one start-up
    (`tests.cli_cases` forks a child per case): the same status and output, without each case's seconds of imports."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.cli_cases"],
        input=json.dumps(cases),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [
        subprocess.CompletedProcess([module, *args], r["returncode"], r["stdout"], r["stderr"])
        for (module, args), r in zip(cases, json.loads(result.stdout), strict=True)
    ]


def tiny_cli_args(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"hydra.run.dir={tmp_path}/run", *extra]
