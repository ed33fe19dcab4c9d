# The README's two commands: `make demo` (set up, run the main job) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m api.demo

lint: $(STAMP)
	$(BIN)/ruff check swav_core api worker migrations tests bench
	$(BIN)/mypy swav_core api worker

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/sinkhorn.py
