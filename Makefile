# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

# The first Python >= 3.12 found: python3.12/3.13 on PATH, then pyenv installs.
PYTHON_BOOT ?= $(shell for c in python3.12 python3.13 python3 $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3; do \
	"$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { command -v "$$c"; break; }; done)

.PHONY: demo test lint setup clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON_BOOT)" || { echo "error: no Python >= 3.12 found; install python3.12 or set PYTHON_BOOT=/path/to/python3.12" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/moeless demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .cache
