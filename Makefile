# The README's commands. `make demo` = the main job, `make test` = the test suite; both set up .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# On a machine without an NVIDIA GPU install the CPU build of torch (no CUDA packages).
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.9" || echo "torch==2.13.0")

.PHONY: setup demo test lint format bench clean

$(BIN)/scratchlm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/scratchlm

demo: setup  ## main job: train on the built-in corpus, then print a sample
	$(BIN)/scratchlm train

test: setup  ## lint + format check + the fast test suite
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo 'error: no tests were collected' >&2; fi; exit $$rc

lint:
	$(BIN)/ruff check src tests benchmarks

format:
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/tokenizer.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
