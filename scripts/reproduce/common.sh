# Sourced by table1.sh and reasoning.sh: their checks, and the run itself (zero-shot, multirun, summary).
# Both end in `reproduce`; what differs between them is its arguments.

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
    # shellcheck disable=SC2086  # the metrics are words; the token totals show what each row's training cost, and
    # the summary's spent-budget columns each row's share of the full-data run's
    "$PYTHON" -m qtuning.summarize "$OUT" --out "$OUT/summary" --plot --metrics $metrics \
        train/loss_tokens_total train/response_tokens_total prune/fwd_tokens_total prune/bwd_tokens_total
    return "$status"
}

# reproduce NAME MODELS DATA_VAR DATA_WHAT SWEEP DATA_GROUP EVAL_PRESET "METRICS" [training overrides...]:
# check the environment (MODEL one of the words of MODELS, MODEL_PATH a directory, the variable named DATA_VAR an
# existing file, EVAL_DATA a directory if set, GRID described or authors), then run_grid of SWEEP (GRID=described,
# the fair comparison) or SWEEP_authors (GRID=authors, the paper's numbers) into OUT (default
# logs/reproduce/NAME_$MODEL, or NAME_authors_$MODEL).
reproduce() {
    local name=$1 models=$2 data_var=$3 data_what=$4 sweep=$5 data=$6 preset=$7 metrics=$8
    shift 8
    MODEL=${MODEL:-}
    [[ -n "$MODEL" ]] || die "set MODEL to one of: $models (the models of the paper's $name grid)"
    [[ " $models " == *" $MODEL "* ]] || die "MODEL=$MODEL: the paper's $name grid has $models (conf/model/)"
    [[ -n "${MODEL_PATH:-}" ]] || die "set MODEL_PATH to a local copy of the base model"
    [[ -d "$MODEL_PATH" ]] || die "MODEL_PATH=$MODEL_PATH is not a directory (runs are offline: a local copy is needed)"
    local data_path=${!data_var:-}
    [[ -n "$data_path" ]] || die "set $data_var to $data_what"
    [[ -e "$data_path" ]] || die "$data_var=$data_path does not exist"
    if [[ -n "${EVAL_DATA:-}" ]]; then
        [[ -d "$EVAL_DATA" ]] || die "EVAL_DATA=$EVAL_DATA is not a directory"
    fi
    GRID=${GRID:-described}
    case "$GRID" in
        described) ;;
        authors) sweep=${sweep}_authors name=${name}_authors ;;
        *) die "GRID=$GRID: described (the baselines as their papers describe them, the fair comparison) or authors \
(every row as the authors' code ran it, to compare with the paper's numbers)" ;;
    esac
    refuse_multi_gpu "$@"
    OUT=${OUT:-logs/reproduce/${name}_$MODEL}
    ZERO_SHOT=${ZERO_SHOT:-1}
    PYTHON=${PYTHON:-python}
    read -r -a EVAL_ARGS <<< "${EVAL_ARGS:-}"
    EVAL_ARGS=(eval="$preset" eval.device=cuda ${EVAL_DATA:+"eval.data_dir=$EVAL_DATA"} ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"})
    run_grid "$sweep" "$data" "$data_path" "$metrics" "$@"
}
