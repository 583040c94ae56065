# Two commands do everything on a fresh machine: `make serve` and `make test`.
# `make docker-test` builds the Docker images and runs them (scripts/docker-test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast lint proto docker-test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,onnx,openvino,bench]"
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

# The gRPC code of the Open Inference Protocol, from its .proto (commit the result;
# tests/test_v2_grpc.py checks it is up to date).
PROTO := service/proto/grpc_predict_v2.proto
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)
