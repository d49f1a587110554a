"""Whatever one process sees, no process waits forever: a non-finite loss on one rank is agreed across ranks before
anyone skips (all skip that pass together), and ``max_bad_steps`` stops every rank together, with one checkpoint.

Rank 1's first decision gets NaN loss weights (`tests.signals.NonFiniteOnRankOneFirst`). Each run is bounded (a hang
fails the test instead of waiting for gloo's 30-minute timeout). Without the agreement, under DDP: in local scope
Lightning stopped rank 1 ("Skipping the `training_step` by returning None in distributed training is not supported");
with ``max_bad_steps=1`` rank 1 stopped alone and rank 0 waited until the test killed both after ``TIMEOUT_S``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qtuning.resume import checkpoint_meta
from tests.conftest import TINY_OVERRIDES, made_once, run_cli, run_on_two_ranks, tiny_cli_args
from tests.test_fsdp2 import recorded_run
from tests.test_window import BUDGETS, STEPS, WINDOW, record

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("nan_on_rank_one")]  # runs of two processes

TIMEOUT_S = 240  # a 5-step run of two processes takes about 30 s here
NAN_ON_RANK_ONE = "pruner._target_=tests.signals.NonFiniteOnRankOneFirst"
SCOPES = {"local": ["data.batch_size=4"], "window": ["data.batch_size=2", "trainer.accumulate_grad_batches=2", WINDOW]}
TRAINERS = ["ddp_cpu", "fsdp2_cpu"]
RUN = [*TINY_OVERRIDES, *STEPS, *BUDGETS["s50"], NAN_ON_RANK_ONE]


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every trainer and scope, one run each, by one pair of processes (`tests.ranks`), made once in the session."""

    def make(root: Path) -> None:
        jobs = []
        for trainer in TRAINERS:
            for scope, overrides in SCOPES.items():
                run_dir = root / f"{trainer}-{scope}"
                jobs.append((run_dir, [*RUN, f"trainer={trainer}", *overrides, *record(run_dir)]))
        run_on_two_ranks(jobs, timeout=2 * TIMEOUT_S)

    return made_once(tmp_path_factory, "nan_on_rank_one", make)


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_a_nan_on_one_rank_is_skipped_by_every_rank(runs, trainer, scope):
    got = recorded_run(runs / f"{trainer}-{scope}")  # both ranks log the same loss at every step
    rank0, rank1 = got["per_rank"]
    assert rank1["trained"][0] == []
    # rank 0 skipped its pass with rank 1 (in a window: those of its passes that rank 1's NaN passes met, under DDP
    # its last, the one that synchronises, under FSDP2 each one)
    if scope == "local":
        assert rank0["trained"][0] == []
    assert all(rank0["trained"][1:]) and all(rank1["trained"][1:])  # then both trained every step
    assert len(got["losses"]) == 5 and all(math.isfinite(loss) for loss in got["losses"][1:])
    for name, weight in rank0["weights"].items():  # the same finite weights on both ranks
        assert torch.isfinite(weight).all()
        torch.testing.assert_close(rank1["weights"][name], weight, rtol=0, atol=0)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_max_bad_steps_on_one_rank_stops_every_rank_with_one_checkpoint(tmp_path, trainer):
    args = tiny_cli_args(tmp_path, *STEPS, f"trainer={trainer}", *SCOPES["local"], *BUDGETS["s50"], NAN_ON_RANK_ONE)
    result = run_cli(*args, "max_bad_steps=1", timeout=TIMEOUT_S)
    assert result.returncode == 2, result.stderr[-3000:]
    # each rank says why in one line (rank 1's may be cut off when Lightning ends it as rank 0 exits)
    errors = {line for line in result.stderr.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1 and next(iter(errors)).startswith("error: max_bad_steps=1"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt"], checkpoints
    assert checkpoint_meta(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 0
