# Every target works on a fresh clone: the virtualenv is created and the project installed on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test demo lint typecheck format bench system-deps lock

# Installs come from the lock files in requirements/ (every package pinned, with hashes), through
# uv; `make lock` refreshes them from pyproject.toml's ranges. The packages are compiled to
# bytecode as they install (as pip does; uv does not by default): where Python may not write
# bytecode (PYTHONDONTWRITEBYTECODE), every process would otherwise compile JAX, Flax, Optuna
# and scikit-learn from source as it starts (measured: 9 s of `caviar run`'s 29 s here).
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
LOCK := requirements/dev.txt
LOCK_ARGS := --universal --python-version 3.11 --generate-hashes --quiet

$(INSTALLED): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==$(UV_VERSION)
	$(UV) pip install --quiet --python $(PY) --require-hashes --compile-bytecode -r $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(INSTALLED)

install: $(INSTALLED)

# The suite creates its PostgreSQL database, or starts a throw-away server from the installed
# binaries; tests needing PostgreSQL or Chromium fail under CI=true without them, else skip.
# The suite runs in TEST_WORKERS processes (pytest-xdist), each with a PostgreSQL database of its
# own. Two at once opened at most 38 connections of a default server's 100; more processes
# need a server that takes more (TEST_WORKERS=0 runs it in this one process).
TEST_WORKERS ?= 2
test: $(INSTALLED)
	$(PY) -m pytest --numprocesses $(TEST_WORKERS) --dist worksteal

# Debian packages the tests use from outside Python (needs root): PostgreSQL's binaries, Chromium.
system-deps:
	@if ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium postgresql >/dev/null; \
	fi

demo: $(INSTALLED)
	$(VENV)/bin/caviar run examples/quickstart.yaml

lint: $(INSTALLED) typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow the editable install's import hook, so it reads the `caviar` namespace through
# links to the four folders (.cache/typecheck, pyproject's mypy_path).
TYPECHECK_TREE := .cache/typecheck/caviar
typecheck: $(INSTALLED)
	mkdir -p $(TYPECHECK_TREE)
	for package in models search db service; do ln -sfn ../../../$$package $(TYPECHECK_TREE)/$$package; done
	$(VENV)/bin/mypy -p caviar.models -p caviar.search -p caviar.db -p caviar.service
	$(VENV)/bin/mypy --explicit-package-bases bench tests deploy/kubernetes/wait_for_migrations.py

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(INSTALLED)
	$(PY) -m bench.engine

# Re-resolve the lock files (base: the CPU image; dev: make and CI; cuda: the GPU image; tpu: TPU
# hosts).
lock: $(INSTALLED)
	$(UV) pip compile pyproject.toml $(LOCK_ARGS) -o requirements/base.txt
	$(UV) pip compile pyproject.toml $(LOCK_ARGS) --extra dev -o requirements/dev.txt
	$(UV) pip compile pyproject.toml $(LOCK_ARGS) --extra cuda -o requirements/cuda.txt
	$(UV) pip compile pyproject.toml $(LOCK_ARGS) --extra tpu -o requirements/tpu.txt
