# Two entry points for a fresh machine (see README "Quickstart"). Both create .venv and install
# the pinned, conflict-free dependency set first; `pip check` fails the target on any conflict.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint

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

test: install lint
	$(BIN)/python -m pytest -q
