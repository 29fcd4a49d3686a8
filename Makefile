# The README's commands. `make demo` = the main job, `make test` = lint + tests; both set up .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# On a machine without an NVIDIA GPU install the CPU build of torch (no CUDA packages).
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.9" || echo "torch==2.13.0")

.PHONY: setup setup-dev demo test lint format bench clean

# core install: what the main job needs (torch, the package, tiktoken for fast encoding, matplotlib for plots)
$(VENV)/.core: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[fast,viz]"
	@touch $@

# dev install: every optional extra (HF parity, triton interpreter, ...) plus pytest, hypothesis and ruff
$(VENV)/.dev: $(VENV)/.core
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.core
setup-dev: $(VENV)/.dev

demo: setup  ## the main job: train on the built-in corpus, then print a sample
	$(BIN)/scratchlm train

test: setup-dev  ## ruff (lint + format check) and the fast test suite; fails when no test is collected
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: no tests were collected" >&2; fi; exit $$rc

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks

format: setup-dev
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: setup-dev  ## CPU benchmarks against their peers; results in benchmarks/results/
	$(BIN)/python benchmarks/tokenizer.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
