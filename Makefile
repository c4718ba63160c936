# Two commands on a fresh machine with Python 3.11 and make: `make run`, `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test faults lint unit schemas bench clean

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
	$(BIN)/python -m pytest --ignore=tests/faults

# The fault-injection suite (tests/faults): real resets, blackholes and full disks in a private network and mount
# namespace (tests/faults/run; root, as in CI). iptables comes from Debian, installed here when missing.
faults: $(STAMP)
	@command -v iptables >/dev/null || [ "$$(id -u)" -ne 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null; }
	tests/faults/run $(FAULTS_ARGS)

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
