#!/usr/bin/env bash
# Fill DIR (default .gpu_carry/, git-ignored) with what scripts/gpu_check.sh needs on a GPU machine that reaches no
# package registry and has torch, lightning, transformers and peft already:
# - wheels of the packages this project adds to those, at this environment's versions: hydra-core, omegaconf,
#   antlr4-python3-runtime, and the token cache's datasets with what its image lacks (dill, multiprocess, xxhash,
#   pyarrow), built for the GPU machine's Python (GPU_PYTHON, 3.12) on manylinux x86_64;
# - SmolLM2's tokenizer files (the random-init models of the check use its 49,152-token vocabulary);
# - the first 512 real ShareGPT conversations as JSONL (data.format=sharegpt).
# About 62 MB (pyarrow's wheel is 55 MB), inside the 64 MiB a working tree may carry to such a machine. Run it here, in
# this project's environment (make setup), then copy DIR along with the checkout:
#   bash scripts/gpu_carry.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu_carry}
python=${PYTHON:-.venv/bin/python}
gpu_python=${GPU_PYTHON:-3.12}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -rf "$dir"
mkdir -p "$dir/wheels"
version() { "$python" -m pip show "$1" | sed -n 's/^Version: //p'; }
for package in hydra-core omegaconf antlr4-python3-runtime; do  # antlr4 4.9.3 is an sdist only: built here
    "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$dir/wheels" "$package==$(version "$package")"
done
for package in datasets dill multiprocess xxhash pyarrow; do
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$dir/wheels" \
        --python-version "$gpu_python" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$package==$(version "$package")"
done
"$python" - "$dir" <<'PY'
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from qtuning.config import config_dir
from qtuning.data import iter_rows
from qtuning.models import build_tokenizer

out = Path(sys.argv[1])
with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    cfg = compose("train", overrides=["model=smollm2_135m"])
build_tokenizer(cfg.model, cfg.paths.cache_dir).save_pretrained(out / "smollm2_tokenizer")
rows = iter_rows(cfg.data.path, salvage_truncated=True)
with open(out / "sharegpt.jsonl", "w") as f:
    for _, row in zip(range(512), rows):
        f.write(json.dumps(row.data) + "\n")
PY
du -sh "$dir"
