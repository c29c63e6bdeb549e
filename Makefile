# Two commands for a newcomer: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser demo test lint bench sandbox clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "Installing Debian's python3-venv…"; $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The browser journeys drive Debian's Chromium (no browser downloads).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for the browser tests…"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

demo: $(STAMP)
	$(BIN)/billing demo

test: $(STAMP) browser
	$(BIN)/ruff check billing workers sandbox migrations tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check billing workers sandbox migrations tests bench

bench: $(STAMP)
	$(BIN)/python bench/sandbox_throughput.py
	$(BIN)/python bench/run_due_bench.py
	$(BIN)/python bench/run_at_scale.py
	$(BIN)/python bench/limiter_bench.py
	$(BIN)/python bench/charge_path.py

sandbox: $(STAMP)
	$(BIN)/billing sandbox

clean:
	rm -rf $(VENV) .billing .pytest_cache .ruff_cache *.egg-info
