"""`scripts/gpu_check.sh --cpu` runs its four steps at tiny shapes, and a training run needs none of the heavy
optional libraries (what a GPU machine without a package registry lacks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_cli_args

HEAVY = ("wandb", "lm_eval", "gguf")  # datasets is needed: the token cache (gpu_carry.sh carries it)


@pytest.mark.slow
def test_gpu_check_cpu_mode_writes_its_report(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "gpu_check.md").read_text()
    for step in ("bench_step, bf16-mixed", "Q-Tuning, trainer=cpu", "LoRA, trainer=fsdp2_cpu"):
        assert f"| {step} | ok |" in report
    assert "| tiny_llama | 8 × 64 | full | separate |" in report  # the benchmark's table
    assert '"trainer/global_step": 3' in report and '"trainer/global_step": 2' in report  # both runs' metrics.json
    assert (tmp_path / "bench_step.json").exists()


@pytest.mark.slow
def test_training_with_a_csv_logger_imports_no_heavy_library(tmp_path):
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in HEAVY)  # importing any of them now fails
    code = f"import runpy, sys; {blocked}; runpy.run_module('qtuning.train', run_name='__main__')"
    args = tiny_cli_args(tmp_path, "logger=csv", "callbacks=default", "pruner=qtuning")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").exists()
