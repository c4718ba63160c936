# Two commands on a fresh machine with Python 3.11 and make: `make run`, `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit schemas bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/vod-bridge dev

lint: $(STAMP)
	$(BIN)/ruff check bridge tests bench examples
	$(BIN)/ruff format --check bridge tests bench examples
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# The benchmark (docs/performance.md): ~1.5 minutes; pass options with BENCH_ARGS='--duration 8 --workers 2'.
$(VENV)/.bench-installed: $(STAMP) pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench $(BENCH_ARGS)

schemas: $(STAMP)
	$(BIN)/vod-bridge schema --write schemas

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
