# The two commands a fresh Debian 12 machine needs: `make run` and `make test`.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup run test unit integration lint typecheck bench clean

setup:
	@scripts/setup.sh

run: setup
	@$(PY) scripts/demo.py

test: setup lint typecheck
	.venv/bin/pytest -p no:cacheprovider

unit: setup
	.venv/bin/pytest -p no:cacheprovider tests/unit

integration: setup
	.venv/bin/pytest -p no:cacheprovider tests/integration

lint:
	.venv/bin/ruff check emberbox tests bench scripts
	.venv/bin/ruff format --check emberbox tests bench scripts

typecheck:
	.venv/bin/mypy

# `make bench BENCH_ARGS=--quick` for a smoke test; `$(PY) -m bench --help` for the knobs.
bench: setup
	@bench/setup.sh
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf .venv .mypy_cache .ruff_cache
