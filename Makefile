# lposs_lab — set-up and checks on a fresh machine.
#   make demo   create .venv, install, segment the example image into outputs/demo (downloads ~1 GB of weights once)
#   make test   create .venv with the dev and app extras, run ruff and pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision: pinned to releases that install from wheels everywhere we run (override on the command line).
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_CLASSES ?= person;astronaut,flag,rocket;space shuttle,wall;background
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv install dev demo test lint clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,app]'
	touch $@

venv: $(BIN)/python
install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/python run.py task=segment image=examples/astronaut.jpg 'classes="$(DEMO_CLASSES)"' \
		out=outputs/demo hydra.run.dir=outputs/demo/.hydra-run $(DEMO_ARGS)

lint: dev
	$(BIN)/ruff check .

test: dev
	$(BIN)/ruff check .
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: dev
	$(BIN)/python benchmarks/bench_propagation.py --quick

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
