# The README's two commands: `make demo` (set up, run the main job) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench browser compose-test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m api.demo

lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check swav_core swav_service api worker swav_client migrations tests bench
	$(BIN)/mypy swav_core swav_service api worker swav_client

# tests/api/test_dashboard.py drives Debian's headless chromium through chromium-driver (no
# browser download at test time); installed here when missing.
browser:
	@if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null; }; \
	fi

test: lint browser
	$(BIN)/pytest -q --durations=15

bench: $(STAMP)
	$(BIN)/python bench/sinkhorn.py

# The compose deployment built and run for real (README, "Deployment"): Docker, Compose and
# dockerd set up when missing (as root), the images Docker Hub would give made locally.
compose-test: $(STAMP)
	bash docker/ci/engine.sh start
	$(BIN)/python docker/ci/compose_test.py; status=$$?; bash docker/ci/engine.sh stop; exit $$status
