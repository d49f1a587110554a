"""The sweep presets in conf/sweep/: their grids, what they fix, and the SLURM launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from qtuning.config import optimizer_factory
from tests.conftest import CONF_DIR, FIXTURES, compose_train


def compose_hydra(*overrides: str) -> DictConfig:
    """conf/train.yaml with its ``hydra`` node, which compose_train drops."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("sweep", "params"),
    [
        ("lambda", {"pruner.lam": "0.0,0.3,0.5,0.7,1.0"}),
        ("batch_size", {"batch": "b8,b16,b32"}),
        ("seeds", {"seed": "1,2,3"}),
    ],
)
def test_sweep_grids(sweep, params):
    cfg = compose_hydra(f"sweep={sweep}")
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == params
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")  # the default launcher stays local


@pytest.mark.parametrize("sweep", ["lambda", "batch_size"])
def test_ablations_run_qtuning_at_the_papers_budget(tmp_path, sweep):
    cfg = compose_train([f"sweep={sweep}"], tmp_path)
    assert cfg.pruner._target_ == "qtuning.pruning.QTuningPolicy"
    assert (cfg.budget.r_sample, cfg.budget.r_token) == (0.25, 0.5)


@pytest.mark.parametrize(("option", "batch_size", "lr"), [("b8", 8, 1e-4), ("b16", 16, 2e-4), ("b32", 32, 4e-4)])
def test_batch_options_scale_the_learning_rate_linearly(tmp_path, option, batch_size, lr):
    swept = compose_train(["sweep=batch_size", f"batch={option}"], tmp_path)  # as the sweeper writes each job
    alone = compose_train([f"+batch={option}", "experiment=paper_lora"], tmp_path)
    for cfg in (swept, alone):
        assert (cfg.data.batch_size, cfg.optimizer.lr) == (batch_size, pytest.approx(lr))


def test_seeds_leave_pruner_and_budget_to_the_command_line(tmp_path):
    cfg = compose_train(["sweep=seeds", "pruner=none", "budget=s50_t70"], tmp_path)
    assert cfg.pruner._target_ == "qtuning.pruning.NoPruning"
    assert (cfg.budget.r_sample, cfg.budget.r_token) == (0.5, 0.7)


def test_slurm_launcher_composes():
    cfg = compose_hydra("sweep=lambda", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu")
    assert "SlurmLauncher" in cfg.hydra.launcher._target_
    assert cfg.hydra.launcher.partition == "gpu"
    assert dict(cfg.hydra.sweeper.params) == {"pruner.lam": "0.0,0.3,0.5,0.7,1.0"}


def jobs(cfg: DictConfig) -> list[list[str]]:
    """The overrides of every job a composed sweep config runs, as its sweeper expands them (rows, then params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.qtuning_rows_sweeper.rows_sweeper import row_jobs

    parser = OverridesParser.create()
    params = parser.parse_overrides([f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()])
    return row_jobs(list(cfg.hydra.sweeper.get("rows") or []), params, parser)


def choices(job: list[str]) -> dict[str, str]:
    return dict(override.split("=", 1) for override in job)


def rows_and_budgets(sweep: str, rename: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """The sweep's rows, named ``<sample>_<token>`` (each preset's name through ``rename``) or by their pruner, in
    order, and its budgets."""
    rows, budgets = [], []
    for job in jobs(compose_hydra(f"sweep={sweep}")):
        c = {k: (rename or {}).get(v, v) for k, v in choices(job).items()}
        row = f"{c['pruner/sample']}_{c['pruner/token']}" if c["pruner"] == "combo" else ROW_NAMES[c["pruner"]]
        rows += [row] if row not in rows else []
        budgets += [c["budget"]] if c["budget"] not in budgets else []
    return rows, budgets


ROW_NAMES = {"qtuning": "qtuning", "none": "full"}


def test_table1_is_the_papers_grid_of_72_jobs():
    methods, budgets = rows_and_budgets("table1")
    pairs = [
        f"{s}_{t}"
        for s in ("random", "longest", "infobatch", "entropy")
        for t in ("random", "ppl", "fastv", "sparsevlm")
    ]
    assert methods == [*pairs, "qtuning", "full"]
    assert budgets == ["s12_t50", "s12_t70", "s25_t50", "s25_t70"]
    assert len(methods) * len(budgets) == 72 == len(jobs(compose_hydra("sweep=table1")))


def test_reasoning_grid():
    assert rows_and_budgets("reasoning")[0] == [
        "infobatch_random", "infobatch_ppl", "infobatch_fastv", "infobatch_sparsevlm", "qtuning", "full"
    ]  # fmt: skip
    assert rows_and_budgets("reasoning")[1] == ["s25_t50", "s25_t70", "s50_t70"]


@pytest.mark.parametrize(
    ("overrides", "target", "sample", "token"),
    [
        ("pruner=combo pruner/sample=infobatch pruner/token=ppl", "ComboPolicy", "InfoBatch", "PPLTokenPolicy"),
        (
            "pruner=combo pruner/sample=longest pruner/token=fastv",
            "ComboPolicy",
            "StaticScorePruner",
            "FastVTokenPolicy",
        ),
        ("pruner=qtuning", "QTuningPolicy", None, None),
        ("pruner=none", "NoPruning", None, None),
    ],
)
def test_pruner_choices_set_the_pruner(tmp_path, overrides, target, sample, token):
    pruner = compose_train(overrides.split(), tmp_path).pruner
    assert pruner._target_ == f"qtuning.pruning.{target}"
    assert (pruner.get("sample") or {}).get("_target_") == (sample and f"qtuning.pruning.{sample}")
    assert (pruner.get("token") or {}).get("_target_") == (token and f"qtuning.pruning.{token}")


# What each sample / token name of a row is in the two grids: the pruner's target and the settings that make it the
# one meant.
AS_DESCRIBED = {
    "sample": {
        "random": ("RandomSubset", {}),
        "longest": ("StaticScorePruner", {"measure": "response_tokens", "keep": "largest"}),
        "infobatch": ("InfoBatch", {"truncate": False, "delta": 0.875}),
        "entropy": ("StaticScorePruner", {"measure": "instruction_entropy", "keep": "smallest"}),
    },
    "token": {
        "random": ("RandomTokenPolicy", {}),
        "ppl": ("PPLTokenPolicy", {}),
        "fastv": ("FastVTokenPolicy", {}),
        "sparsevlm": ("SparseVLMTokenPolicy", {"inverted": False}),
    },
}
AS_THE_AUTHORS_RAN = {
    "sample": {
        **AS_DESCRIBED["sample"],
        "longest": ("StaticScorePruner", {"measure": "instruction_chars", "keep": "smallest"}),  # the shortest
        "infobatch": ("InfoBatch", {"truncate": True, "delta": 1.0}),
    },
    "token": {**AS_DESCRIBED["token"], "sparsevlm": ("SparseVLMTokenPolicy", {"inverted": True})},
}
# the authors' presets, by the name of the row they stand for
AUTHORS_PRESETS = {"shortest": "longest", "infobatch_truncated": "infobatch", "fastv_authors": "fastv"}
AUTHORS_PRESETS["sparsevlm_authors"] = "sparsevlm"
UNPAIRED = {"qtuning": "QTuningPolicy", "full": "NoPruning"}  # the same in both grids (Q-Tuning's defaults: authors')
GRIDS = {  # sweep: (what its rows' names mean, the token pruners it trains at half the learning rate)
    "table1": (AS_DESCRIBED, set()),
    "table1_authors": (AS_THE_AUTHORS_RAN, {"fastv", "sparsevlm"}),
    "reasoning": (AS_DESCRIBED, set()),
    "reasoning_authors": (AS_THE_AUTHORS_RAN, {"fastv", "sparsevlm"}),
}


def check_pruner(node: DictConfig, expected: tuple[str, dict]) -> None:
    target, settings = expected
    assert node._target_ == f"qtuning.pruning.{target}"
    assert {k: node[k] for k in settings} == settings


@pytest.mark.parametrize("sweep", sorted(GRIDS))
def test_every_row_of_each_grid_composes_to_its_pruners_and_learning_rate(tmp_path, sweep):
    meaning, half_lr = GRIDS[sweep]
    rows = [job for job in jobs(compose_hydra(f"sweep={sweep}")) if choices(job)["budget"] == "s25_t50"]
    assert len(rows) == (18 if sweep.startswith("table1") else 6)
    for row in rows:
        cfg = compose_train([f"sweep={sweep}", *row, "experiment=paper_lora"], tmp_path)  # one job
        c = choices(row)
        token = None
        if c["pruner"] in ROW_NAMES:
            assert cfg.pruner._target_ == f"qtuning.pruning.{UNPAIRED[ROW_NAMES[c['pruner']]]}"
        else:
            sample, token = AUTHORS_PRESETS.get(c["pruner/sample"], c["pruner/sample"]), None
            token = AUTHORS_PRESETS.get(c["pruner/token"], c["pruner/token"])
            assert cfg.pruner._target_ == "qtuning.pruning.ComboPolicy"
            check_pruner(cfg.pruner.sample, meaning["sample"][sample])
            check_pruner(cfg.pruner.token, meaning["token"][token])
        # the rate the optimizer gets: paper_lora's 1e-4, halved for FastV and SparseVLM in the authors' grids
        optimizer = optimizer_factory(cfg)([torch.nn.Parameter(torch.zeros(1))])
        assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5 if token in half_lr else 1e-4), row


def test_the_authors_grids_differ_from_the_described_ones_only_in_their_authors_rows():
    for sweep in ("table1", "reasoning"):
        described_rows, budgets = rows_and_budgets(sweep)
        authors, authors_budgets = rows_and_budgets(f"{sweep}_authors", AUTHORS_PRESETS)
        assert authors == described_rows
        assert authors_budgets == budgets
    # the rows whose pruners and learning rate are the same as described are listed as they are
    as_listed = rows_and_budgets("reasoning_authors")[0]
    assert [m for m in as_listed if m in described_rows] == ["qtuning", "full"]


SWEEPS_BEFORE = FIXTURES / "sweeps_before.json"


def expansion(conf_dir: Path, sweep: str) -> list[str]:
    """Every job of ``sweep`` (composed from ``conf_dir``) as its resolved pruner, budget and learning-rate factor,
    sorted: what the job trains with, whatever its overrides are called."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        sweep_cfg = compose("train", overrides=[f"sweep={sweep}"], return_hydra_config=True)
        if "rows" in sweep_cfg.hydra.sweeper:
            overrides = jobs(sweep_cfg)
        else:  # the basic sweeper the configs used before
            from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
            from hydra.core.override_parser.overrides_parser import OverridesParser

            params = [f"{k}={v}" for k, v in sweep_cfg.hydra.sweeper.params.items()]
            overrides = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]
        entries = []
        for job in overrides:
            cfg = compose("train", overrides=[f"sweep={sweep}", *job])
            pruner = OmegaConf.to_container(cfg.pruner, resolve=True)
            factor = (
                cfg.get("lr_scale", 1.0)
                * pruner.pop("lr_scale", 1.0)
                * (pruner.get("token") or {}).pop("lr_scale", 1.0)
            )
            budget = OmegaConf.to_container(cfg.budget, resolve=True)
            extra = {"batch_size": cfg.data.batch_size, "lr": cfg.optimizer.lr, "seed": cfg.seed}
            entries.append(
                json.dumps({"pruner": pruner, "budget": budget, "lr_factor": factor, **extra}, sort_keys=True)
            )
    GlobalHydra.instance().clear()
    return sorted(entries)


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml")))
def test_every_sweep_runs_the_jobs_it_ran_before_the_method_presets_were_folded(sweep):
    """``sweeps_before.json``: `expansion` of every sweep on the configs of commit 8028b67, when the paper's rows were
    31 ``method=`` presets (``python -c "from tests.test_sweeps import write_before; write_before(CONF_DIR)"``)."""
    assert expansion(CONF_DIR, sweep) == json.loads(SWEEPS_BEFORE.read_text())[sweep]


def write_before(conf_dir: Path) -> None:
    sweeps = sorted(p.stem for p in (Path(conf_dir) / "sweep").glob("*.yaml"))
    SWEEPS_BEFORE.write_text(json.dumps({s: expansion(Path(conf_dir), s) for s in sweeps}, indent=0) + "\n")
