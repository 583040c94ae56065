# Two commands do everything on a fresh machine: `make serve` and `make test`.
# `make docker-test` builds the Docker images and runs them (scripts/docker-test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast lint docker-test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,onnx]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/mad serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

docker-test: $(STAMP)
	PYTHON=$(BIN)/python scripts/docker-test
