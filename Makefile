# Everything runs from one virtual environment with pinned versions.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# pytest-xdist: one worker per core (at most 4: each holds torch and a forkserver in memory).
WORKERS ?= -n auto --maxprocesses=4 --dist worksteal

.PHONY: install train test test-fast lint format clean

install:  ## create .venv and install the package, its pinned dependencies and dev tools
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -e ".[dev]"

train:  ## train with the default config; pass Hydra overrides as ARGS="strategy=finetune ..."
	$(BIN)/python train.py $(ARGS)

test:  ## the whole test suite, slow end-to-end tests included
	$(BIN)/python -m pytest $(WORKERS)

test-fast:  ## skip the slow end-to-end tests
	$(BIN)/python -m pytest $(WORKERS) -m "not slow"

lint:  ## ruff (lint + format check), mypy, and the import layers (pyproject.toml [tool.importlinter])
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf logs multirun outputs .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache
