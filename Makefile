# Two entry points on a fresh machine:  `make demo` (generate + score on the built-in shapes model)
# and `make test` (the test suite). Each creates the virtual environment it needs in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffprobe generate --model shapes --prompt "two red circles" --prompt "a blue square and a yellow triangle" --prompt "a green circle to the left of a red square" --seeds 0-7 --out runs/demo
	$(BIN)/diffprobe score scs runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

.PHONY: install demo test test-all lint
