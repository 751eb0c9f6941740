# Two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/*.proto)

.PHONY: setup run test protos bench lint clean

setup: $(STAMP)

# Re-install only when pyproject.toml changes; a second `make` is a no-op.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,lint]'
	touch $@

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

run: setup
	$(VENV)/bin/imesh up --demo

# ruff (lint and format check) and mypy on the core packages; .ci/run runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup
	$(PY) -m pytest -n 2 -q

# A few minutes; writes docs/benchmarks.md and its plots. wrk is Debian's load generator.
bench: setup
	command -v wrk >/dev/null || (apt-get update && apt-get install -y --no-install-recommends wrk)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
