# Two entry points matter: `make serve` (train if needed, export, serve) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/quick
MODEL_BASE ?= models
MODEL_NAME ?= cifar10
HOST ?= 127.0.0.1
PORT ?= 8080
PYTEST_ARGS ?=

export KERAS_BACKEND ?= tensorflow
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv serve test lint bench bench-train bench-serve loadtest clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

serve: $(STAMP)
	@RUN_DIR=$(RUN_DIR) MODEL_BASE=$(MODEL_BASE) MODEL_NAME=$(MODEL_NAME) HOST=$(HOST) PORT=$(PORT) \
		PY=$(PY) bash scripts/serve.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	@bash scripts/ensure-chromium.sh
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# Each benchmark writes its JSON to benchmarks/results/; the report turns them into docs/benchmarks.md.
bench: bench-train bench-serve
	$(PY) -m benchmarks.report

bench-train: $(STAMP)
	$(PY) -m benchmarks.train_throughput --out benchmarks/results/train_throughput.json

bench-serve: $(STAMP)
	$(PY) -m benchmarks.serving_latency --out benchmarks/results/serving_latency.json

loadtest: $(STAMP)
	$(PY) -m tests.load.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
