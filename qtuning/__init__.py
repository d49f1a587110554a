"""qtuning: data-efficient supervised fine-tuning with per-step sample and token pruning (Q-Tuning and baselines)."""

IGNORE_INDEX = -100
