# girder-upload-stream: developer and CI entry points.
# Quick start on a fresh machine: `make demo` and `make test` (see README.md).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
OMSI_VENV := .venv-openmsistream
OMSI_VERSION := 1.8.8
STACKCTL := $(PYTHON) -m stack.stackctl
PYTEST_ARGS ?=
# Parallel test processes (pytest-xdist). The integration tests mostly wait (for Kafka,
# Girder, the consumers they start), so more processes than the 2 cores pay; tests with
# fixed names share an xdist_group, `serial` ones have the stack alone (docs/testing.md).
TEST_WORKERS ?= 3
PARALLEL := -n $(TEST_WORKERS) --dist loadgroup
# The unit tests are CPU-bound: one process per core.
UNIT_WORKERS ?= 2
BENCH_ARGS ?=

.PHONY: help install libsodium browser stack-install stack-up stack-down stack-status stack-env \
        prefect-up prefect-down test unit integration demo bench profile clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(VENV)/.installed $(OMSI_VENV)/.installed  ## Create .venv (project, editable, with test deps) and the OpenMSIStream test venv

$(VENV)/.installed: pyproject.toml
	@$(MAKE) -s libsodium
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip uv
	$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python -e '.[test,kafkacrypto]'
	touch $@

# kafkacrypto (encrypted topics) calls libsodium through ctypes: the runtime library
# is enough, no headers. Installed with apt when the dynamic linker does not know it.
libsodium:  ## Install the system's libsodium (for KafkaCrypto) if it is missing
	@if ldconfig -p 2>/dev/null | grep -q 'libsodium\.so'; then :; \
	elif command -v apt-get >/dev/null; then \
	  echo "installing libsodium23 (needed by kafkacrypto)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libsodium23; \
	else echo "libsodium not found and no apt-get: install libsodium for KafkaCrypto" >&2; exit 1; fi

# The browser test (tests/integration/test_browser.py) drives Debian's Chromium through
# its chromedriver. Installed with apt when missing; no browser is ever downloaded.
browser:  ## Install Debian's chromium and chromium-driver (the browser test) if missing
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver (for the browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "chromium or chromedriver missing and no apt-get: install them for the browser test" >&2; exit 1; fi

# OpenMSIStream is a test-only reference implementation. It lives in its own venv so
# its `GirderUploadStreamProcessor` console script never shadows ours in .venv/bin.
$(OMSI_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(OMSI_VENV)
	$(VENV)/bin/uv pip install -q --python $(OMSI_VENV)/bin/python 'openmsistream==$(OMSI_VERSION)'
	touch $@

stack-install:  ## Build/download the stack's artifacts (Kafka and mongo-java-server via Maven, Girder venv)
	@$(STACKCTL) install

stack-up: install  ## Start Kafka, the MongoDB-protocol server and Girder on 127.0.0.1 (idempotent)
	@$(STACKCTL) up

stack-down:  ## Stop the stack (by PID)
	@$(STACKCTL) down

stack-status:  ## Show each stack process, its port and memory
	@$(STACKCTL) status

stack-env:  ## Print `export NAME=VALUE` lines: eval "$$(make -s stack-env)"
	@$(STACKCTL) env

prefect-up: install  ## Start a local Prefect server (SQLite) with the UI on http://127.0.0.1:24200
	@$(STACKCTL) up prefect
	@$(STACKCTL) env prefect

prefect-down:  ## Stop the Prefect worker (and its runs) and the local Prefect server
	@$(STACKCTL) down prefect worker

unit: install  ## Unit tests only (nothing running needed), one process per core
	$(VENV)/bin/pytest -m "not integration" -n $(UNIT_WORKERS) --durations=10 $(PYTEST_ARGS)

integration: install browser  ## Integration tests against the running stack (starts one if none), in parallel
	$(VENV)/bin/pytest -m integration $(PARALLEL) --durations=20 $(PYTEST_ARGS)

test: install browser  ## Install everything, start the stack, run the whole suite in parallel (20 slowest shown), stop the stack
	@$(STACKCTL) up
	@status=0; $(VENV)/bin/pytest $(PARALLEL) --durations=20 $(PYTEST_ARGS) || status=$$?; \
	  $(STACKCTL) down; exit $$status

demo: install  ## Stack, Prefect UI, deployments and their worker; upload a sample tree with a deployment run
	@$(STACKCTL) up kafka mongo girder prefect
	@set -a; eval "$$($(STACKCTL) env kafka mongo girder prefect)"; set +a; \
	  PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_LOGGING_EXTRA_LOGGERS=girder_upload_stream \
	  $(VENV)/bin/python -m girder_upload_stream.cli.demo

bench: install  ## Run the benchmarks (issue 6) and write docs/benchmarks.md; BENCH_ARGS=--quick for a smoke run
	@$(STACKCTL) up kafka mongo girder prefect
	@set -a; eval "$$($(STACKCTL) env kafka mongo girder prefect)"; set +a; \
	  PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/python -m benchmarks.run_all $(BENCH_ARGS)

profile: install  ## Profile one consumer run with py-spy and summarise it; PROFILE_ARGS='--files 8 --size-kib 65536'
	@$(VENV)/bin/python -c "import shutil, sys; sys.exit(0 if shutil.which('py-spy', path='$(VENV)/bin') else 'py-spy missing: $(VENV)/bin/pip install py-spy')"
	@$(STACKCTL) up kafka mongo girder prefect
	@set -a; eval "$$($(STACKCTL) env kafka mongo girder prefect)"; set +a; \
	  PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/python -m benchmarks.profile_consumer $(PROFILE_ARGS)

clean: prefect-down stack-down  ## Stop the stack and delete .stack/ and the virtualenvs
	rm -rf .stack $(VENV) $(OMSI_VENV)
