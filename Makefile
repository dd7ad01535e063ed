# Two entry points matter: `make serve` (train if needed, export, serve) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/quick
MODEL_BASE ?= models
MODEL_NAME ?= cifar10
HOST ?= 127.0.0.1
PORT ?= 8080
PYTEST_ARGS ?=
# pytest-xdist processes for `make test` (0: one process). Two suit the 2-core CI machine: much of
# the suite waits on subprocesses (gunicorn, trainers, exporters), so two cut its ~30 min to ~19.
# Each process trains its own session fixtures and imports TensorFlow (~1-2 GiB): more than 2-4
# costs memory before it saves time. --dist loadfile keeps a file's module fixtures in one process.
TEST_WORKERS ?= 2

# One stamp per install set, so each target installs only what it runs: `make serve` the base
# dependencies (training, export, serving), `make test` adds the test tools and the jax and load
# extras. Each stamp depends on pyproject.toml, so changed dependencies reinstall.
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test
LOAD_STAMP := $(VENV)/.installed-load
BENCH_STAMP := $(VENV)/.installed-bench

export KERAS_BACKEND ?= tensorflow
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv serve test lint bench bench-train bench-small-data bench-serve bench-decode bench-gpu-prepare loadtest clean

# A development environment: everything the test suite needs.
venv: $(TEST_STAMP)

$(BASE_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@touch $@

# Extras install on top of the base (pip keeps what is already there).
$(TEST_STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e '.[test,jax,load]'
	@touch $@

$(LOAD_STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e '.[load]'
	@touch $@

$(BENCH_STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e '.[load]'
	@touch $@

serve: $(BASE_STAMP)
	@RUN_DIR=$(RUN_DIR) MODEL_BASE=$(MODEL_BASE) MODEL_NAME=$(MODEL_NAME) HOST=$(HOST) PORT=$(PORT) \
		PY=$(PY) bash scripts/serve.sh

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

test: $(TEST_STAMP)
	@bash scripts/ensure-debian-packages.sh chromium 'nginx!' hey redis-server
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Each benchmark writes its JSON to benchmarks/results/; the report turns them into docs/benchmarks.md.
bench: bench-train bench-small-data bench-serve bench-decode
	$(PY) -m benchmarks.report

bench-train: $(BENCH_STAMP)
	$(PY) -m benchmarks.train_throughput --out benchmarks/results/train_throughput.json

# Our trainer with default flags vs a seed tutorial CNN on small real data (scikit-learn's digits).
bench-small-data: $(BENCH_STAMP)
	$(PY) -m benchmarks.small_data --out benchmarks/results/small_data.json

# The model the default profile trains, bare and behind the gateway, the naive app, LitServe, the TF
# Serving double and the lean Flask app
# (about 5 minutes); then whether batch-norm folding or freezing speeds the served graph.
bench-serve: $(BENCH_STAMP)
	@bash scripts/ensure-debian-packages.sh 'hey!'
	$(PY) -m benchmarks.serving_latency --out benchmarks/results/serving_latency.json
	$(PY) -m benchmarks.bn_folding --out benchmarks/results/bn_folding.json

# Large JPEGs (VGA to a 12 Mpx phone photo) decoded to 32x32 whole vs at libjpeg's reduced scale, the
# memory of one decode, and the gateway and the naive app answering a phone photo (about 1.5 minutes).
bench-decode: $(BENCH_STAMP)
	@bash scripts/ensure-debian-packages.sh 'hey!'
	$(PY) -m benchmarks.photo_decode --out benchmarks/results/photo_decode.json

# The GPU training benchmark runs on a lent GPU machine (no network there): this fills .whl/ with the
# Keras wheels and .gpu-data/ with CIFAR-10 in parts, and prints the device calls that run
# scripts/gpu-bench.sh there (benchmarks/gpu_train.py -> benchmarks/results/gpu_train.json).
bench-gpu-prepare: $(TEST_STAMP)
	PYTHON=$(PY) bash scripts/gpu-bench.sh prepare

loadtest: $(LOAD_STAMP)
	$(PY) -m loadtest.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
