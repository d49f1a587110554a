"""The scoring hooks the task YAMLs name as ``!function utils.<fn>``: lm-eval resolves ``utils`` next to the YAML."""

from qtuning.evaluation.scoring import (
    gsm8k_process_results,
    math_process_results,
    math_target,
    squad2_process_results,
    squad2_target,
    triviaqa_process_results,
)

__all__ = [
    "gsm8k_process_results",
    "math_process_results",
    "math_target",
    "squad2_process_results",
    "squad2_target",
    "triviaqa_process_results",
]
