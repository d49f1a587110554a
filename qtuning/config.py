"""Where the Hydra configs are, checks that need no model or data, instantiation that reports errors against the
config key, and the resolver that names sweep directories (registered on import: every entry point imports this)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qtuning.errors import QTuningError
from qtuning.ranges import out_of_range

MAX_DIRNAME = 120


def config_dir() -> str:
    """The Hydra config directory: the checkout's ``conf/`` beside the package (a clone, an editable install), else
    the copy a wheel installs inside the package (``qtuning/conf``)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "conf"
    return str(checkout if (checkout / "train.yaml").is_file() else package / "conf")


def short_dirname(name: str) -> str:
    """A sweep job's directory name: its overrides, cut with a hash suffix when too long for a file name."""
    name = name.replace("/", "_") or "default"
    if len(name) <= MAX_DIRNAME:
        return name
    return f"{name[: MAX_DIRNAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("short_dirname", short_dirname, replace=True)


def check_config(cfg: DictConfig) -> None:
    """Checks that need no model or data, so that a typo fails in a second, naming the key: every value given, every
    number in its range (`qtuning.ranges`), all problems in one message."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise QTuningError(f"{', '.join(missing)}: required, but no value given (set it on the command line)")
    problems = out_of_range(cfg)
    if problems:
        raise QTuningError("; ".join(problems))  # every one at once: a run is not retried once per typo


def instantiate_key(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Hydra's instantiate, with a constructor's ValueError reported against the config key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise QTuningError(f"{key}: {cause}") from None
        raise


def optimizer_factory(cfg: DictConfig) -> Any:
    """The partial optimizer of ``cfg.optimizer`` at the run's learning rate, ``optimizer.lr * lr_scale``."""
    return instantiate_key(cfg.optimizer, "optimizer", lr=cfg.optimizer.lr * cfg.lr_scale)
