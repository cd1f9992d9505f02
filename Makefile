# Every target works on a fresh clone: the virtualenv is created and the project installed on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test demo lint format bench system-deps

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

# The suite creates its PostgreSQL database, or starts a throw-away server from the installed
# binaries; tests needing PostgreSQL or Chromium fail under CI=true without them, else skip.
test: $(INSTALLED)
	$(PY) -m pytest

# Debian packages the tests use from outside Python (needs root): PostgreSQL's binaries, Chromium.
system-deps:
	@if ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium postgresql >/dev/null; \
	fi

demo: $(INSTALLED)
	$(VENV)/bin/caviar run examples/quickstart.yaml

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(INSTALLED)
	$(PY) -m bench.engine
