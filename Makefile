# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch==2.13.0 first: an unpinned torch pulls a CUDA build of several GB.
# The base install is only the device runtime; `compile` brings the compiler (TVM, onnx, onnxruntime).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[compile,runtime,torch,models,dev]"
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -x -q -m "not slow"

bench: setup
	$(PY) benchmarks/bench_ffn.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
