"""The sweep presets in conf/sweep/: their grids, what they fix, and the SLURM launcher."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

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
