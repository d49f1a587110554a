"""Progress lines: their text from hand-computed numbers, and a real run whose stdout is a file writes them there and
into train.log."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qtuning.progress import progress_line
from tests.conftest import ROOT, TINY_OVERRIDES


def test_progress_line_text():
    # 62 s for the first 20 steps: 3.1 s a step, 280 steps to go -> 868 s
    line = progress_line(20, 300, 1.83612, 5210.4, 62.0, 20)
    assert line == "step 20/300 (7%) | loss 1.8361 | 5,210 tokens/s | elapsed 0:01:02 | ETA 0:14:28"
    # resumed at step 100: the pace is that of the 20 steps since, not of all 120
    assert progress_line(120, 300, None, None, 62.0, 20).endswith("elapsed 0:01:02 | ETA 0:09:18")
    assert progress_line(7, None, 2.0, None, 3.4, 7) == "step 7 | loss 2.0000 | elapsed 0:00:03"


@pytest.mark.slow
def test_redirected_output_gets_a_progress_line_every_n_steps(tmp_path: Path):
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("callbacks=", "trainer.max_steps="))]
    run_dir = tmp_path / "run"
    args = [*overrides, "callbacks=default", "~callbacks.checkpoint", "callbacks.progress.every_n_steps=2"]
    args += ["trainer.max_steps=5", "validate_before_fit=false", f"hydra.run.dir={run_dir}"]
    with (tmp_path / "out.txt").open("w") as out:  # not a terminal
        result = subprocess.run(
            [sys.executable, "-m", "qtuning.train", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    pattern = (
        r"step (\d)/5 \((\d+)%\) \| loss \d+\.\d{4} \| [\d,]+ tokens/s \| elapsed \d:\d\d:\d\d \| ETA \d:\d\d:\d\d$"
    )
    for text in ((tmp_path / "out.txt").read_text(), (run_dir / "train.log").read_text()):
        found = [re.search(pattern, line) for line in text.splitlines() if "qtuning.progress" in line]
        assert [(m[1], m[2]) for m in found if m] == [("2", "40"), ("4", "80"), ("5", "100")], text[-3000:]
