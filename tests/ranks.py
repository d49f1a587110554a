"""Several multi-process training runs for the start-up of one: ``python -m tests.ranks RANK PORT JOBS_JSON`` is one
of two processes started together (as ``torchrun`` or ``srun`` would start them: Lightning then launches none itself)
that run the jobs of ``JOBS_JSON``, ``[{"dir": ..., "overrides": [...]}, ...]``, one after the other, each with
``train(cfg)`` in one process group. A job that raises writes ``<dir>/error_rank<r>.txt`` and the next one starts.

Each job as its own ``python -m qtuning.train trainer=ddp_cpu`` spends 10-15 s importing in both of its processes
before a few seconds of training.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

WORLD = 2


def main() -> None:
    rank, port, jobs_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(WORLD), "RANK": str(rank),
         "LOCAL_RANK": str(rank), "NODE_RANK": "0", "TOKENIZERS_PARALLELISM": "false"}
    )  # fmt: skip
    from qtuning.train import train
    from tests.conftest import compose_train

    for job in json.loads(Path(jobs_file).read_text()):
        run_dir = Path(job["dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            train(compose_train(job["overrides"], run_dir))
        except Exception:
            (run_dir / f"error_rank{rank}.txt").write_text(traceback.format_exc())


if __name__ == "__main__":
    main()
