"""The installable package: every config group is packaged, the wheel carries the configs and the lm-eval task YAMLs,
and the installed commands run a tiny job from an empty directory, a user's own config folder adding an experiment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qtuning.config import config_dir
from tests.conftest import CONF_DIR, ROOT, TINY_DATA

# The job of the done-when, as an experiment in a user's own config folder.
TINY_EXPERIMENT = f"""# @package _global_
defaults:
  - override /model: tiny_llama
  - override /data: file
  - override /logger: none
data:
  path: {TINY_DATA}
  format: prompt_completion
  val_size: 8
trainer:
  max_steps: 2
"""


def packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_config_group_and_subpackage_is_a_listed_package():
    groups = {"qtuning.conf." + ".".join(d.relative_to(CONF_DIR).parts) for d in CONF_DIR.rglob("*") if d.is_dir()}
    sources = [*(ROOT / "qtuning").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]  # the rows sweeper too
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in sources}
    assert packages() == {"qtuning.conf", *(g for g in groups if g != "qtuning.conf.local"), *code}


def test_config_dir_is_the_checkout_conf_here():
    assert Path(config_dir()) == CONF_DIR


def test_a_user_config_folder_on_the_search_path_adds_an_experiment(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(TINY_EXPERIMENT)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine"])
    GlobalHydra.instance().clear()
    assert (cfg.model.name, cfg.data.path, cfg.trainer.max_steps) == ("tiny_llama", str(TINY_DATA), 2)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def checkout_copy(target: Path) -> Path:
    """What a fresh clone holds (tracked and new, not ignored, files), copied to ``target``: the build must not need
    anything else, nor write into the checkout."""
    try:
        listed = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout")
    for name in listed:
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@pytest.mark.slow
def test_wheel_carries_the_configs_and_its_commands_run_from_an_empty_dir(tmp_path):
    pytest.importorskip("setuptools", minversion="77", reason="the dev extra installs it (pip install -e '.[dev]')")
    source = checkout_copy(tmp_path / "clone")
    (source / "conf" / "local").mkdir(exist_ok=True)
    (source / "conf" / "local" / "default.yaml").write_text("seed: 1\n")  # a user's git-ignored file: not shipped
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
    run(build, check=True)
    (wheel,) = (tmp_path / "dist").glob("qtuning-*.whl")

    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("qtuning/")}
    configs = {f"qtuning/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    code_and_tasks = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "qtuning").rglob("*") if p.suffix in (".py", ".yaml")
    }
    assert shipped == {c for c in configs if not c.startswith("qtuning/conf/local/")} | code_and_tasks
    assert {f"qtuning/evaluation/tasks/qtuning_{t}.yaml" for t in ("arc_easy", "gsm8k", "math")} <= shipped
    assert "qtuning/conf/train.yaml" in shipped and "qtuning/conf/pruner/sample/infobatch.yaml" in shipped

    site = tmp_path / "site"
    run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True)
    user_conf = tmp_path / "my_conf"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "tiny.yaml").write_text(TINY_EXPERIMENT)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not the checkout

    where = [sys.executable, "-c", "import qtuning.config as c; print(c.config_dir())"]
    installed = run(where, cwd=empty, env=env, check=True).stdout.strip()
    assert installed == str(site / "qtuning" / "conf")
    commands = {
        "console script": [str(site / "bin" / "qtuning-train"), "--config-dir", str(user_conf), "experiment=tiny"],
        "module": [sys.executable, "-m", "qtuning.train", f"hydra.searchpath=[file://{user_conf}]", "experiment=tiny"],
    }
    for name, command in commands.items():
        run_dir = empty / "logs" / name
        result = run([*command, f"hydra.run.dir={run_dir}"], cwd=empty, env=env)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        assert json.loads((run_dir / "metrics.json").read_text())["trainer/global_step"] == 2, name
    assert sorted(p.name for p in empty.iterdir()) == ["logs"]  # nothing written outside the run directories
