"""The allowed range of every number a user can set, by config group and key, checked before anything is loaded.

A key names a leaf by its path inside its group, and also matches that path below any sub-node: ``pruner``'s
``r_token`` is ``pruner.r_token`` and, under ``pruner=combo``, ``pruner.token.r_token``;
``*`` matches any key (``eval.limits.<task>``). Top-level keys (group ``""``) match only themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (None: unbounded), each end closed unless marked open; ``integer``: counts."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        kind = "an integer " if self.integer else ""
        if self.low is not None and self.high is not None:
            return f"{kind}in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind}{'>' if self.low_open else '>='} {self.low}"
        return f"{kind}{'<' if self.high_open else '<='} {self.high}"


class Either:
    """Any of ``options``: a `Range`, an exact value (-1 for "no limit", None for null) or a type (``str``)."""

    def __init__(self, *options: Any) -> None:
        self.options = options

    def allows(self, value: Any) -> bool:
        return any(_allows(option, value) for option in self.options)

    def __str__(self) -> str:
        names = {None: "null", str: "a string"}
        return " or ".join(names.get(option, str(option)) for option in self.options)


def _allows(option: Any, value: Any) -> bool:
    if isinstance(option, Range):
        return option.allows(value)
    if isinstance(option, type):
        return isinstance(value, option)
    return type(value) is type(option) and value == option  # -1 is not True, 1.0 is not 1


COUNT = Range(1, integer=True)
NONNEG_INT = Range(0, integer=True)
POSITIVE = Range(0, low_open=True)
NONNEG = Range(0)
SHARE = Range(0, 1, low_open=True)  # a kept fraction: (0, 1]
UNIT = Range(0, 1)
BELOW_ONE = Range(0, 1, high_open=True)
SEED = Range(0, 2**32 - 1, integer=True)  # what numpy, and so Lightning's seed_everything, accepts
COUNT_OR_NULL = Either(COUNT, None)
CHECKPOINT_EVERY = Either(NONNEG_INT, None)  # ModelCheckpoint: 0 or null turns that trigger off
SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")

RANGES: dict[str, dict[str, Range | Either]] = {
    "": {
        "seed": SEED,
        "ckpt_every_n_steps": CHECKPOINT_EVERY,
        "max_bad_steps": COUNT,
        "num_samples": COUNT_OR_NULL,
        "lr_scale": POSITIVE,
    },
    "budget": {"r_sample": SHARE, "r_token": SHARE},
    "data": {
        "max_length": Range(2, integer=True),
        "batch_size": COUNT,
        "val_size": NONNEG_INT,
        "limit": COUNT_OR_NULL,
        "num_workers": NONNEG_INT,
        "num_proc": COUNT_OR_NULL,
        "seed": SEED,
    },
    "trainer": {
        "max_epochs": Either(COUNT, -1, None),  # -1: no epoch limit
        "max_steps": Either(NONNEG_INT, -1),  # 0: a valid run that trains nothing (Lightning)
        "devices": Either(COUNT, -1, str),  # Lightning also reads "auto" and "0,1"
        "num_nodes": COUNT,
        "accumulate_grad_batches": COUNT,
        "log_every_n_steps": COUNT,
        "gradient_clip_val": Either(NONNEG, None),
        "val_check_interval": Either(COUNT, SHARE, None),  # batches, or a fraction of the epoch
        "num_sanity_val_steps": Either(NONNEG_INT, -1),
    },
    "optimizer": {"lr": POSITIVE, "weight_decay": NONNEG, "eps": POSITIVE, "momentum": NONNEG, "betas.*": BELOW_ONE},
    "scheduler": {"warmup_ratio": BELOW_ONE, "min_lr_ratio": UNIT},
    "pruner": {
        "r_sample": SHARE,
        "r_token": SHARE,
        "seed": SEED,
        "lam": UNIT,
        "q_max": Range(0, 0.5, low_open=True, high_open=True),
        "ppl_guard": BELOW_ONE,
        "bisect_iters": COUNT,
        "bisect_tol": POSITIVE,
        "delta": UNIT,
    },
    "eval": {
        "limit": Either(POSITIVE, None),  # documents per task, or a fraction of them below 1
        "limits.*": Either(POSITIVE, None),
        "batch_size": COUNT,
        "max_length": COUNT,
        "bootstrap_iters": NONNEG_INT,
        "max_gen_toks.*": COUNT,
    },
    "model": {
        "lora.r": COUNT,
        "lora.alpha": POSITIVE,
        "lora.dropout": BELOW_ONE,
        **{f"architecture.{k}": COUNT_OR_NULL for k in (*SIZES, "vocab_size", "max_position_embeddings")},
        "architecture.rope_theta": POSITIVE,
    },
    "callbacks": {
        "every_n_train_steps": CHECKPOINT_EVERY,
        "every_n_epochs": CHECKPOINT_EVERY,
        "plot_every_n_steps": COUNT,
        "every_n_steps": COUNT,
        "n_examples": NONNEG_INT,
        "save_top_k": Either(NONNEG_INT, -1),
    },
}


def _paths(node: Any, prefix: str = "") -> Iterator[str]:
    """The dotted paths of the leaves below a plain (unresolved) container."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if children is None:
        yield prefix
        return
    for key, child in children:
        yield from _paths(child, f"{prefix}.{key}" if prefix else str(key))


def _rule(group: str, path: str) -> Range | Either | None:
    for key, rule in RANGES[group].items():
        if fnmatchcase(path, key) or (group and fnmatchcase(path, f"*.{key}")):
            return rule
    return None


def _interpolated(tree: Any, path: str) -> bool:
    """Whether the leaf at ``path`` of an unresolved container takes its value from another key (``${...}``)."""
    node = tree
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return isinstance(node, str) and node.startswith("${")


def out_of_range(cfg: DictConfig) -> list[str]:
    """Every number outside its range, each as ``key=value must be <range>``, in config order; only the leaves with
    a rule are resolved (others may interpolate what is not known yet)."""
    problems = []
    for group in RANGES:
        node = cfg if not group else cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        tree = OmegaConf.to_container(node, resolve=False)
        paths = [k for k in tree if not isinstance(tree[k], dict | list)] if not group else _paths(tree)
        for path in paths:
            rule = _rule(group, path)
            key = f"{group}.{path}" if group else path
            if _interpolated(tree, path):  # checked where its value is set: one problem, named once
                continue
            if rule is not None and not rule.allows(value := OmegaConf.select(cfg, key)):
                problems.append(f"{key}={value} must be {rule}")
    return problems
