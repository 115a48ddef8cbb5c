# Fresh machine: `make demo` runs the quickstart, `make test` runs the tests. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch, installed before anything can pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# The quickstart needs fewer extras than the tests: a fresh `make demo` installs only those.
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: setup browser test test-all demo lint format bench clean

setup: $(STAMP)

# $(call venv_with,EXTRA): .venv with CPU torch first, then lmforge[EXTRA] in editable mode.
define venv_with
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(1)]"
endef

$(STAMP): pyproject.toml Makefile
	$(call venv_with,dev)
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml Makefile
	$(call venv_with,demo)
	touch $(DEMO_STAMP)

# Headless Chromium for the report's browser test (Debian's package; needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: chromium could not be installed; the browser test will say so"

test: setup browser
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

demo: $(DEMO_STAMP)
	$(BIN)/lmforge quickstart

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache .ruff_cache
