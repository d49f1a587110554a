"""Shared fixtures: offline environment, the character tokenizer, and the composed training config (tiny model)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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


def run_cli(
    *args: str, module: str = "qtuning.train", cwd: Path = ROOT, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the repository root, output captured. Past ``timeout`` seconds the whole
    process group (the processes a multi-process run launched too) is killed and the test fails saying so."""
    command = [sys.executable, "-m", module, *args]
    with subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"still running after {timeout} s, killed: {' '.join(args)}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


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


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A directory that ``make`` fills once per test session, whichever xdist worker asks first; a worker that asks
    meanwhile waits for it (pytest-xdist's documented pattern: a file lock in the workers' shared temporary root)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    target = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"once-{name}"
    with FileLock(f"{target}.lock"):
        if not (target / ".made").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            make(target)
            (target / ".made").touch()
    return target


def run_on_two_ranks(jobs: list[tuple[Path, list[str]]], timeout: float = 600) -> None:
    """Each ``(run_dir, overrides)`` trained by two processes started together (`tests.ranks`), one job after the
    other; past ``timeout`` seconds both are killed and the test fails."""
    jobs_file = jobs[0][0].parent / "jobs.json"
    jobs_file.write_text(json.dumps([{"dir": str(d), "overrides": o} for d, o in jobs]))
    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tests.ranks"]
    processes = [
        subprocess.Popen([*command, str(rank), str(port), str(jobs_file)], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in range(2)
    ]  # fmt: skip
    deadline = time.monotonic() + timeout
    errors = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"two ranks still running after {timeout} s, killed: {[o for _, o in jobs]}")
        if process.returncode != 0:
            errors.append(stderr[-3000:])
    assert not errors, errors


def tiny_cli_args(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"hydra.run.dir={tmp_path}/run", *extra]
