"""Experiment loggers from the `logger` config group; W&B runs offline unless the user is logged in."""

from __future__ import annotations

import logging
import netrc
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

WANDB_BLOCK = 32 * 1024


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes); no network call."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC", os.path.expanduser("~/.netrc"))).hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def _sweep_identity() -> tuple[str | None, str | None]:
    """(group, name) for a multirun job: the sweep directory's name and the job's overrides; (None, None) otherwise."""
    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, None
    return Path(hydra_cfg.sweep.dir).name, hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Instantiate every entry of ``cfg.logger``; fill W&B's mode, group and name when the config leaves them null."""
    loggers: list[Logger] = []
    for name, entry in (cfg.get("logger") or {}).items():
        entry = entry.copy()
        if entry._target_.endswith("WandbLogger"):
            group, run_name = _sweep_identity()
            with open_dict(entry):
                if entry.get("offline") is None:
                    entry.offline = not wandb_logged_in() and "WANDB_MODE" not in os.environ
                entry.group = entry.get("group") or group
                entry.name = entry.get("name") or run_name
            Path(entry.save_dir).mkdir(parents=True, exist_ok=True)
        log.debug("logger %s: %s", name, OmegaConf.to_yaml(entry))
        loggers.append(instantiate(entry))
    return loggers


def finish_wandb(loggers: list[Logger]) -> None:
    """End the W&B run of these loggers, so that the next job of a multirun in this process gets its own; wandb is
    imported only when one of them is a W&B logger."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def describe_wandb(loggers: list[Logger]) -> str | None:
    """Where the W&B run is and, for an offline run, the command that uploads it."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run: Any = logger.experiment
            run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
            if run_dir is None:
                return None
            if run.offline:  # Lightning turns offline=True into WANDB_MODE=dryrun
                return f"W&B offline run: {run_dir}  (upload with: wandb sync {run_dir})"
            return f"W&B run: {getattr(run, 'url', None) or run_dir}"
    return None


def read_offline_run(run_file: str | Path) -> Iterator[Any]:
    """The records (``wandb_internal_pb2.Record``) of an offline run's ``run-*.wandb`` file, without uploading it.

    The file is a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte header (checksum, length, type:
    1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file}: not a W&B run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = WANDB_BLOCK - pos % WANDB_BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left_in_block < 7 or (length == 0 and kind == 0):  # block padding
            pos += left_in_block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_history_keys(run_file: str | Path) -> set[str]:
    """Every key logged to the history of an offline run (media keys included, without their sub-fields)."""
    keys: set[str] = set()
    for record in read_offline_run(run_file):
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or item.nested_key[0] for item in record.history.item}
    return keys
