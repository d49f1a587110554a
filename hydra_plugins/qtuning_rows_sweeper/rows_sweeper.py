"""``hydra/sweeper=rows``: Hydra's basic sweeper over a union of rows.

``hydra.sweeper.rows`` lists rows, each a space-separated group of overrides (sweeps allowed: ``pruner/sample=random,
longest``); each row is swept as a grid together with ``hydra.sweeper.params`` and the command line, and the jobs of
every row run one after another. The paper's tables are such a union: sample pruner × token pruner, plus Q-Tuning and
full data. Without rows it sweeps as the basic sweeper does.
"""

# No `from __future__ import annotations`: Hydra runs plugin modules outside sys.modules while it scans them, where
# dataclasses cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override


def row_jobs(rows: list[str], overrides: list[Override], parser: OverridesParser) -> list[list[str]]:
    """Every job's overrides: each row's grid with ``overrides`` (the params and the command line), row after row."""
    jobs: list[list[str]] = []
    for row in rows or [""]:
        jobs += BasicSweeper.split_arguments([*parser.parse_overrides(row.split()), *overrides], None)[0]
    return jobs


class RowsSweeper(BasicSweeper):
    """The basic sweeper, its grid taken row by row (`row_jobs`)."""

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None, rows: list[str] | None = None):
        super().__init__(max_batch_size, params)
        self.rows = list(rows or [])

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:  # type: ignore[override]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = row_jobs(self.rows, overrides, parser)
        return list(self.split_overrides_to_chunks(jobs, max_batch_size))


@dataclass
class RowsSweeperConf:  # OmegaConf's structured configs take typing's Optional, not X | None
    _target_: str = "hydra_plugins.qtuning_rows_sweeper.rows_sweeper.RowsSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045
    params: Optional[dict[str, str]] = None  # noqa: UP045
    rows: list[str] = field(default_factory=list)


ConfigStore.instance().store(group="hydra/sweeper", name="rows", node=RowsSweeperConf, provider="qtuning")
