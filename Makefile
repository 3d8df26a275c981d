# The two commands a fresh Debian 12 machine needs: `make run` and `make test`.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup run test unit integration lint typecheck bench soak clean

setup:
	@scripts/setup.sh

run: setup
	@$(PY) scripts/demo.py

# The pure unit tests on two workers; then the tests that boot VMs and servers, one at a
# time (they share servers within a module, and two servers must not race for the same
# network block or the two cores); the 15 slowest are listed at the end.
test: setup lint typecheck
	.venv/bin/pytest -p no:cacheprovider -n 2 tests/unit
	.venv/bin/pytest -p no:cacheprovider --durations=15 tests/integration tests/hostile tests/cluster

unit: setup
	.venv/bin/pytest -p no:cacheprovider tests/unit

integration: setup
	.venv/bin/pytest -p no:cacheprovider tests/integration

lint:
	.venv/bin/ruff check emberbox tests bench scripts
	.venv/bin/lint-imports
	.venv/bin/ruff format --check emberbox tests bench scripts

typecheck:
	.venv/bin/mypy

# `make bench BENCH_ARGS=--quick` for a smoke test; `$(PY) -m bench --help` for the knobs.
bench: setup
	@bench/setup.sh
	$(PY) -m bench $(BENCH_ARGS)

# Hostile load for SOAK_S seconds (default 120): bars in bench/soak.py; writes
# bench/results/soak.json and fails when one is missed. `make test` runs a short form.
SOAK_S ?= 120
soak: setup
	$(PY) -m bench.soak --duration-s $(SOAK_S)

clean:
	rm -rf .venv .mypy_cache .ruff_cache
