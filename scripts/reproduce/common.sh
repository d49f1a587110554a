# Sourced by table1.sh and reasoning.sh: their checks, and the run itself (zero-shot, multirun, summary).

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# A multi-process strategy cannot run inside a multirun with Hydra's basic launcher: Lightning restarts each extra rank
# with this process's own command line (sys.argv: -m, sweep=...), so every rank would start the whole grid.
refuse_multi_gpu() {
    local launcher=basic arg
    for arg in "$@"; do [[ "$arg" == hydra/launcher=submitit* ]] && launcher=submitit; done
    for arg in "$@"; do
        case "$arg" in
            trainer=ddp* | trainer=fsdp* | trainer=deepspeed* | trainer.strategy=ddp* | trainer.strategy=fsdp* \
            | trainer.strategy=deepspeed* | trainer.devices=-1 | trainer.devices=[2-9]*)
                [[ "$launcher" == submitit ]] || die "$arg: multi-GPU training cannot run inside this multirun with the \
basic launcher (every DDP rank would relaunch the whole sweep); run one job per GPU (scripts/reproduce/README.md, \
several GPUs), or add hydra/launcher=submitit_slurm with hydra.launcher.tasks_per_node=N hydra.launcher.gpus_per_node=N" ;;
        esac
    done
}

# run_grid SWEEP DATA_GROUP DATA_PATH "METRICS" [training overrides...]; uses MODEL, MODEL_PATH, OUT, ZERO_SHOT,
# PYTHON and the array EVAL_ARGS. The base model zero-shot (unless done or ZERO_SHOT=0), then the whole grid as one
# Hydra multirun (one job and W&B run per row x budget), then the summary. Hydra runs every job and fails at the end
# if one did: the summary is written either way (failed jobs listed as missing) and the status passed on.
run_grid() {
    local sweep=$1 data=$2 data_path=$3 metrics=$4 status=0
    shift 4
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export WANDB_MODE=${WANDB_MODE:-offline}
    mkdir -p "$OUT"
    if [[ "$ZERO_SHOT" != 0 && ! -f "$OUT/zero_shot/metrics.json" ]]; then
        "$PYTHON" -m qtuning.eval model="$MODEL" model.name_or_path="$MODEL_PATH" "${EVAL_ARGS[@]}" \
            hydra.run.dir="$OUT/zero_shot"
    fi
    "$PYTHON" -m qtuning.train -m sweep="$sweep" experiment=paper_lora model="$MODEL" model.name_or_path="$MODEL_PATH" \
        data="$data" data.path="$data_path" "${EVAL_ARGS[@]}" hydra.sweep.dir="$OUT/train" "$@" || status=$?
    # shellcheck disable=SC2086  # the metrics are words; the token totals show what each row's training cost
    "$PYTHON" -m qtuning.summarize "$OUT" --out "$OUT/summary" --plot --metrics $metrics \
        train/loss_tokens_total prune/fwd_tokens_total prune/bwd_tokens_total
    return "$status"
}
