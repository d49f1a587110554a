#!/usr/bin/env bash
# A real, small reproduction of the paper's Table 1, 25% samples x 50% tokens block, on a 2-core CPU (~2 hours):
# SmolLM2-135M-Instruct with LoRA on real ShareGPT chats (conf/experiment/mini_repro.yaml), seven training rows and
# the base model, all evaluated on ARC-E and ARC-C (full dev sets), TriviaQA and SQuAD (fixed subsets).
#
#   bash scripts/mini_repro.sh                       # writes docs/results/mini_table1.md
#   OUT=logs/try ROWS="'pruner=none','pruner=qtuning'" EVAL_ARGS="eval.limit=20" bash scripts/mini_repro.sh data.limit=300
# Arguments go to the training jobs; EVAL_ARGS (eval.* overrides) to every evaluation, the base model's included.
#
# Rows (hydra.sweeper.rows of conf/experiment/mini_repro.yaml, or ROWS: quoted overrides, one row each): full data,
# Random / Random, Longest / PPL, InfoBatch / Random, Entropy / PPL, Q-Tuning as the authors coded it, and Q-Tuning
# with the noise-robust triage of docs/noise_probe.md.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-logs/mini_repro}
ROWS=${ROWS:-}
DOC=${DOC:-docs/results/mini_table1.md}
read -r -a EVAL_ARGS <<< "${EVAL_ARGS:-}"
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=${WANDB_MODE:-offline}

started=$(date +%s)
rm -rf "$OUT"
# The base model, zero-shot: the same evaluation, no training.
"$PYTHON" -m qtuning.eval model=smollm2_135m eval=mini hydra.run.dir="$OUT/zero_shot" ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"}
# Every row: same seed, learning rate, schedule and epochs; one Hydra multirun, one W&B run per row.
rows=(); [ -n "$ROWS" ] && rows=("hydra.sweeper.rows=[$ROWS]")
"$PYTHON" -m qtuning.train -m experiment=mini_repro hydra.sweep.dir="$OUT/train" ${rows[@]+"${rows[@]}"} \
    ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"} "$@"
"$PYTHON" -m qtuning.summarize "$OUT" --out "$OUT/summary" \
    --metrics arc_easy/acc arc_challenge/acc triviaqa/exact_match triviaqa/contains squad2/f1 runtime_s eval/runtime_s
elapsed=$(( $(date +%s) - started ))

mkdir -p "$(dirname "$DOC")"
{
    echo "# Mini-reproduction of Table 1 (25% samples × 50% tokens) on a CPU"
    echo
    echo "Command: \`ROWS=$ROWS EVAL_ARGS=\"${EVAL_ARGS[*]+${EVAL_ARGS[*]}}\" bash scripts/mini_repro.sh $*\` — $((elapsed / 60)) min $((elapsed % 60)) s on this machine" \
         "($(nproc) CPU cores, torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))."
    echo "Setup: \`conf/experiment/mini_repro.yaml\` (its rows${ROWS:+: $ROWS}); evaluation \`conf/eval/mini.yaml\`."
    echo "\`runtime_s\` is a row's wall time (training, validation and evaluation), \`eval/runtime_s\` its evaluation."
    echo
    tail -n +2 "$OUT/summary.md"   # without its own title
} > "$DOC"
echo "wrote $DOC"
