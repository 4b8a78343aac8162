# The two commands a new user runs are `make demo` and `make test`; both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.ts-handlers-setup

.PHONY: setup archives bench-archives demo test unit integration bench bench-peers bench-formats bench-int8 lint clean

# AOTInductor's compiled kernels and headers, reused by later builds and tests.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/build/inductor-cache

setup: $(SETUP_STAMP)

$(SETUP_STAMP): setup.cfg pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# Trains the demo checkpoints once (cached under build/), then exports, verifies and archives
# every archiver_configs/<name>/ into model_store/<name>.mar.
archives: setup
	$(PY) scripts/train_digits.py
	$(PY) scripts/train_sentiment.py
	$(PY) scripts/train_ner.py
	$(PY) scripts/train_reranker.py
	$(PY) scripts/fetch_minilm.py
	$(PY) -m ts_handlers.tools.build --all

demo: archives
	$(PY) scripts/demo.py

test: archives
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest tests

integration: archives
	$(PY) -m pytest integration_tests

bench: archives
	$(PY) benchmarks/embeddings.py

# Archives only the benchmarks use (MiniLM compiled by AOTInductor in bfloat16 and int8, and
# ONNX Runtime's int8); the int8 builds search which layers stay float32, which `make test` has
# no need to wait for.
bench-archives: archives
	$(PY) -m ts_handlers.tools.build --all --configs-root benchmarks/archiver_configs

# Our archives against ONNX Runtime in-process (the anchor), LitServe and Infinity serving the
# same MiniLM (docs/performance.md). The peers live in their own environment, .venv-peers, set
# up here once; never part of `make test`.
bench-peers: bench-archives .venv-peers/.ts-handlers-peers
	$(PY) benchmarks/peers.py

# TorchScript against AOTInductor and ONNX Runtime: export time, size, worker load time, first
# answer.
bench-formats: bench-archives
	$(PY) benchmarks/formats.py

# How much faster int8 can make MiniLM on this CPU (fbgemm's and ONNX Runtime's kernels over
# every Linear layer), and how much of that the accuracy gate keeps (docs/performance.md).
bench-int8: archives
	$(PY) benchmarks/int8_bound.py

.venv-peers/.ts-handlers-peers: scripts/setup_peers.sh constraints.txt
	bash scripts/setup_peers.sh
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build model_store/*.mar logs .venv-peers
