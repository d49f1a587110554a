"""The paper's benchmarks as local, offline lm-eval tasks: task YAMLs, their data, and answer scoring."""

from qtuning.evaluation.data import TASKS, EvalTask, export_olmo, metric_key, prepare_tasks

__all__ = ["TASKS", "EvalTask", "export_olmo", "metric_key", "prepare_tasks"]
