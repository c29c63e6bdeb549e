# Two commands for a newcomer: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench sandbox clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/billing demo

test: $(STAMP)
	$(BIN)/ruff check billing workers sandbox migrations tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check billing workers sandbox migrations tests bench

bench: $(STAMP)
	$(BIN)/python bench/sandbox_throughput.py

sandbox: $(STAMP)
	$(BIN)/billing sandbox

clean:
	rm -rf $(VENV) .billing .pytest_cache .ruff_cache *.egg-info
