"""The sweep presets in conf/sweep/: their grids, what they fix, and the SLURM launcher."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from qtuning.config import optimizer_factory
from tests.conftest import CONF_DIR, compose_train


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


def sweep_values(cfg: DictConfig, key: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_overrides([f"{key}={cfg.hydra.sweeper.params[key]}"])[0]
    return list(override.sweep_string_iterator())


def test_table1_is_the_papers_grid_of_72_jobs():
    cfg = compose_hydra("sweep=table1")
    methods, budgets = sweep_values(cfg, "method"), sweep_values(cfg, "budget")
    pairs = [
        f"{s}_{t}"
        for s in ("random", "longest", "infobatch", "entropy")
        for t in ("random", "ppl", "fastv", "sparsevlm")
    ]
    assert methods == [*pairs, "qtuning", "full"]
    assert budgets == ["s12_t50", "s12_t70", "s25_t50", "s25_t70"]
    assert len(methods) * len(budgets) == 72


def test_reasoning_grid():
    cfg = compose_hydra("sweep=reasoning")
    assert sweep_values(cfg, "method") == [
        "infobatch_random", "infobatch_ppl", "infobatch_fastv", "infobatch_sparsevlm", "qtuning", "full"
    ]  # fmt: skip
    assert sweep_values(cfg, "budget") == ["s25_t50", "s25_t70", "s50_t70"]


@pytest.mark.parametrize(
    ("method", "target", "sample", "token"),
    [
        ("infobatch_ppl", "ComboPolicy", "InfoBatch", "PPLTokenPolicy"),
        ("longest_fastv", "ComboPolicy", "StaticScorePruner", "FastVTokenPolicy"),
        ("qtuning", "QTuningPolicy", None, None),
        ("full", "NoPruning", None, None),
    ],
)
def test_method_sets_the_pruner(tmp_path, method, target, sample, token):
    pruner = compose_train([f"method={method}"], tmp_path).pruner
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
    rows = sweep_values(compose_hydra(f"sweep={sweep}"), "method")
    assert len(rows) == (18 if sweep.startswith("table1") else 6)
    for row in rows:
        cfg = compose_train([f"sweep={sweep}", f"method={row}", "experiment=paper_lora"], tmp_path)  # one job
        name = row.removesuffix("_authors")
        token = None
        if name in UNPAIRED:
            assert cfg.pruner._target_ == f"qtuning.pruning.{UNPAIRED[name]}"
        else:
            sample, token = name.split("_")
            assert cfg.pruner._target_ == "qtuning.pruning.ComboPolicy"
            check_pruner(cfg.pruner.sample, meaning["sample"][sample])
            check_pruner(cfg.pruner.token, meaning["token"][token])
        # the rate the optimizer gets: paper_lora's 1e-4, halved for FastV and SparseVLM in the authors' grids
        optimizer = optimizer_factory(cfg)([torch.nn.Parameter(torch.zeros(1))])
        assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5 if token in half_lr else 1e-4), row


def test_the_authors_grids_differ_from_the_described_ones_only_in_their_authors_rows():
    for sweep in ("table1", "reasoning"):
        described = sweep_values(compose_hydra(f"sweep={sweep}"), "method")
        authors = sweep_values(compose_hydra(f"sweep={sweep}_authors"), "method")
        assert [m.removesuffix("_authors") for m in authors] == described
        assert compose_hydra(f"sweep={sweep}_authors").hydra.sweeper.params.budget == (
            compose_hydra(f"sweep={sweep}").hydra.sweeper.params.budget
        )
    # the rows whose pruners and learning rate are the same as described are listed as they are
    assert [m for m in authors if not m.endswith("_authors")] == ["qtuning", "full"]
