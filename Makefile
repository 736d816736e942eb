# kdm: two-command quickstart.  `make demo` runs the checkerboard distillation through a local Prefect
# server + worker; `make test` runs the test suite (CI=true: a skipped non-GPU test fails). `make stop` stops what the demo started.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
KDM_PORT ?= 4200
STATE := .kdm

.PHONY: demo test stop install distill help

help:
	@echo "make demo   - install into .venv, start Prefect on 127.0.0.1:$(KDM_PORT), run kdm/distill-checkerboard"
	@echo "make test   - install into .venv (and Debian's chromium for the UI tests, as root) and run the test suite"
	@echo "make stop   - stop the demo's worker and server"
	@echo "make distill - the same pipeline without Prefect (kdm distill --preset checkerboard)"

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test,metrics]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	KDM_PORT=$(KDM_PORT) bash scripts/demo.sh

stop:
	KDM_PORT=$(KDM_PORT) bash scripts/stop.sh

distill: $(VENV)/.installed
	$(VENV)/bin/kdm distill --preset checkerboard --root artifacts

test: $(VENV)/.installed
	bash scripts/test.sh
