# Two entry points for a fresh machine (see README "Quickstart"). Both create .venv and install
# the pinned, conflict-free dependency set first; `pip check` fails the target on any conflict.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint gpu-check

$(BIN)/orchestrator: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip check
	touch $(BIN)/orchestrator

install: $(BIN)/orchestrator

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Everything (what CI runs, via .ci/run): lint, then every test, end-to-end included (~25 min on
# 2 cores; the 25 slowest tests are listed at the end, to keep an eye on the 30-minute budget).
test: install lint
	$(BIN)/python -m pytest -q --durations=25

# The fast lane while editing: unit + integration tests, no lint, no end-to-end test (no real
# torchrun worker group; everything under tests/e2e is marked `e2e`) and no fault suite
# (tests/faults, marked `faults`). About 3 min on 2 cores.
test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e and not faults"

# The CUDA paths on a GPU machine (needs a CUDA build of torch): digits fp16+GradScaler killed and
# resumed bit-identically, pinned staging, the --device cuda bench legs; < 8 min on one GPU.
# Results in $(GPU_CHECK_OUT) (summary.json, summary.md). Exit 69 at once where CUDA is unusable.
GPU_CHECK_OUT ?= bench/results/gpu-check
gpu-check: install
	$(BIN)/python -m bench.gpu_check --out $(GPU_CHECK_OUT)
