# `make demo` and `make test` work on a fresh machine with only Python 3.11+:
# both create .venv and install the project into it first.

# The first Python >= 3.11 found on PATH (override: make test PYTHON=python3.12).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test check lint typecheck imports unit integration reliability bench clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "maas-worker needs Python 3.11 or newer on PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,worker,flower,local]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/maas-worker demo

## test: lint, type-check, the unit tests with a coverage report, then every other test
## (integration, reliability at its small size) without one; the 20 slowest of those are
## listed (CI must stay under ~20 minutes on 2 cores)
test: check
	$(BIN)/pytest tests/unit $(COV_ARGS)
	$(BIN)/pytest --ignore=tests/unit --durations=20

check: lint typecheck imports

lint: venv
	$(BIN)/ruff check maas_worker tests $(wildcard benchmarks/*.py)
	$(if $(filter 1,$(FORMAT_CHECK)),$(BIN)/ruff format --check $(FORMAT_PATHS))

typecheck: venv
	$(BIN)/mypy

## imports: the layers and forbidden-import contracts ([tool.importlinter] in pyproject.toml)
imports: venv
	$(BIN)/lint-imports

unit: venv
	$(BIN)/pytest tests/unit

integration: venv
	$(BIN)/pytest tests/integration

## reliability: faults, fuzzing, load and leak checks at full size (docs/reliability.md);
## `make test` runs the same suite at its small size
reliability: venv
	MAAS_RELIABILITY_SCALE=full $(BIN)/pytest -m reliability tests/reliability

## bench: every benchmark (minutes; figures go to docs/benchmarks.md by hand)
bench: venv
	$(BIN)/python benchmarks/micro.py
	$(BIN)/python benchmarks/guards.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/compute.py
	$(BIN)/python benchmarks/models.py
	$(BIN)/python benchmarks/batching.py

.PHONY: format coverage

# The code ruff formats (configured in [tool.ruff.format] of pyproject.toml).
FORMAT_PATHS := maas_worker tests benchmarks scripts
# 1 once the tree has been reformatted with `make format`: `make lint` (so `make check`
# and `make test`) then also fails on code ruff would format differently. Until then
# `make lint FORMAT_CHECK=1` shows what the reformat would change.
FORMAT_CHECK ?= 0

## format: apply ruff's automatic lint fixes, then its formatter; `make lint` reports the rest
format: venv
	$(BIN)/ruff check --fix-only $(FORMAT_PATHS)
	$(BIN)/ruff format $(FORMAT_PATHS)

# Coverage of maas_worker with branches; [tool.coverage.*] in pyproject.toml.
COV_ARGS := --cov=maas_worker --cov-report=term-missing:skip-covered

## coverage: every test under coverage, the worker, beat and Flower processes the tests
## start included (coverage's subprocess patch); several minutes slower than `make test`,
## so CI does not run it. Report in the terminal and in htmlcov/index.html.
coverage: venv
	$(BIN)/pytest $(COV_ARGS) --cov-report=html

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info .coverage .coverage.* htmlcov
