# Two commands on a fresh machine:  `make serve`  and  `make test`.
# Both create .venv, install the project into it (quickly skipped when nothing changed) and fetch the
# embedded default model once.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch; override (e.g. TORCH_SPEC="torch>=2.11") on a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: install model serve test bench smoke demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the dependency list or this file changes.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

model: install
	$(BIN)/python -m tools.fetch_model

serve: model
	$(BIN)/python launch.py --host $(HOST) --port $(PORT)

test: model
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: model
	$(BIN)/python bench/bench_suite.py

smoke: model
	$(BIN)/python tools/smoke_test.py --max-new-tokens 32 "Hello from mini-sglang"

demo: model
	$(BIN)/python tools/cli_demo.py --multi-turn

clean:
	rm -rf $(VENV) .pytest_cache bench/results
