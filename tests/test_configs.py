"""Every config file composes, and the parts that build on a CPU machine instantiate."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qtuning.config import check_config
from qtuning.errors import QTuningError
from tests.conftest import CONF_DIR, TINY_OVERRIDES, compose_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUPS = [
    "model",
    "data",
    "pruner",
    "budget",
    "trainer",
    "logger",
    "callbacks",
    "eval",
    "experiment",
    "sweep",
]
GROUPS += ["debug", "batch"]
ADDED = {"batch"}  # groups outside train.yaml's defaults list: added with +group=option
ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    assert all(options(g) for g in GROUPS)


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes(tmp_path, group, option):
    cfg = compose_train([f"{'+' if group in ADDED else ''}{group}={option}"], tmp_path)
    assert cfg.model.name and cfg.trainer._target_
    missing = sorted(OmegaConf.missing_keys(cfg))  # the values a user must give: the data file of a data option
    assert set(missing) <= {"data.path", "data.format"}
    if missing:
        with pytest.raises(QTuningError, match=f"{', '.join(missing)}: required, but no value given"):
            check_config(cfg)
    else:
        check_config(cfg)


# Values the range table must let through (Lightning's own forms, null, -1 for "no limit") and the near misses it must
# not; every shipped option is in range (test_every_option_composes), the CLI's messages are in test_bad_input.
IN_RANGE = [
    "trainer.devices=auto",
    "trainer.max_steps=-1",
    "trainer.max_epochs=null",
    "trainer.val_check_interval=0.5",
    "trainer.val_check_interval=20",
    "data.limit=null",
    "scheduler.warmup_ratio=0",
    "+optimizer.betas=[0.9,0.99]",
    "callbacks=default ckpt_every_n_steps=null +callbacks.checkpoint.every_n_epochs=1",
]
OUT_OF_RANGE = {
    "trainer.max_steps=-2": "trainer.max_steps=-2 must be an integer >= 0 or -1",  # 0 trains nothing (Lightning)
    "trainer.val_check_interval=1.5": "trainer.val_check_interval=1.5 must be an integer >= 1 or in (0, 1] or null",
    "data.batch_size=2.0": "data.batch_size=2.0 must be an integer >= 1",
    "optimizer.lr=true": "optimizer.lr=True must be > 0",
    "+optimizer.betas=[0.9,1.0]": "optimizer.betas.1=1.0 must be in [0, 1)",
    "model.architecture.hidden_size=0": "model.architecture.hidden_size=0 must be an integer >= 1 or null",
    "eval=mini eval.limits.squad2=0": "eval.limits.squad2=0 must be > 0 or null",
    "budget.r_sample=0.5 pruner.r_sample=0": "pruner.r_sample=0 must be in (0, 1]",
    "lr_scale=0": "lr_scale=0 must be > 0",
}


@pytest.mark.parametrize("overrides", IN_RANGE)
def test_numbers_in_range_pass(tmp_path, overrides):
    check_config(compose_train([*TINY_OVERRIDES, *overrides.split()], tmp_path))


@pytest.mark.parametrize(("overrides", "message"), OUT_OF_RANGE.items())
def test_numbers_out_of_range_name_key_value_and_range(tmp_path, overrides, message):
    cfg = compose_train([*TINY_OVERRIDES, *overrides.split()], tmp_path)
    with pytest.raises(QTuningError) as err:
        check_config(cfg)
    assert str(err.value) == message


@pytest.mark.parametrize("option", options("pruner"))
def test_every_pruner_instantiates(tmp_path, option):
    cfg = compose_train([*TINY_OVERRIDES, f"pruner={option}", "budget=s25_t50"], tmp_path)
    from qtuning.pruning import PruningPolicy

    assert isinstance(instantiate(cfg.pruner), PruningPolicy)


@pytest.mark.parametrize("option", ["default", "cpu"])
def test_cpu_trainers_instantiate(tmp_path, option):
    cfg = compose_train([*TINY_OVERRIDES, f"trainer={option}"], tmp_path)
    trainer = instantiate(cfg.trainer)
    assert trainer.max_steps == 3


@pytest.mark.parametrize("option", options("logger"))
def test_loggers_instantiate(tmp_path, option):
    from qtuning.loggers import build_loggers

    cfg = compose_train([*TINY_OVERRIDES, f"logger={option}"], tmp_path)
    assert len(build_loggers(cfg)) == (0 if option == "none" else 1)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_instantiate(tmp_path, option):
    cfg = compose_train([*TINY_OVERRIDES, f"callbacks={option}"], tmp_path)
    assert all(instantiate(c) is not None for c in (cfg.callbacks or {}).values())


def test_model_presets_point_at_the_papers_models(tmp_path):
    names = {o: compose_train([f"model={o}"], tmp_path).model for o in ("llama2_7b", "mistral_7b", "llama3_8b")}
    assert all(m.lora.enabled and m.dtype == "bf16" and m.chat_template == "plain" for m in names.values())


@pytest.mark.parametrize("key", ["r_sample", "r_token"])
@pytest.mark.parametrize("value", [0, 1.5, -1])
def test_check_config_names_the_bad_ratio(tmp_path, key, value):
    cfg = compose_train([f"budget.{key}={value}"], tmp_path)
    with pytest.raises(QTuningError, match=rf"^budget\.{key}={value} must be in \(0, 1\]$"):
        check_config(cfg)


def test_analyze_config_composes_with_its_own_sizes(tmp_path):
    cfg = compose_train([], tmp_path, "analyze")
    assert cfg.pruner._target_ == "qtuning.pruning.QTuningPolicy" and cfg.data.val_size == 0
    assert cfg.num_samples == 256 and cfg.data.max_length == 256
    check_config(cfg)


def test_every_number_out_of_range_is_reported_at_once(tmp_path):
    cfg = compose_train(["optimizer.lr=-1", "data.batch_size=0"], tmp_path)
    with pytest.raises(QTuningError) as err:
        check_config(cfg)
    assert str(err.value) == "data.batch_size=0 must be an integer >= 1; optimizer.lr=-1 must be > 0"
