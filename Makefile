# make test   build the extension and run the tests (creates .venv on first use)
# make bench  fused_rnn vs nn.RNN on the default shapes, on whatever device is there
# PYTHON=python3 make test   use an interpreter that already has torch (offline machines)

VENV ?= .venv
ifdef PYTHON
PY := $(PYTHON)
STAMP := .build-stamp-external
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fused_rnn-deps
endif
PIP := $(PY) -m pip
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*) setup.py
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test bench bench-pytest build clean sanitize

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip

$(VENV)/.fused_rnn-deps: | $(VENV)/bin/python
	$(PIP) install torch ninja pybind11 pytest pytest-benchmark numpy matplotlib setuptools wheel build scikit-learn hypothesis
	touch $@

.build-stamp-external:
	touch $@

build: $(STAMP) $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3

test: build
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: build
	$(PY) -m bench.run $(BENCH_ARGS)

bench-pytest: build
	$(PY) -m pytest bench/test_bench.py --benchmark-only --benchmark-group-by=param:shape $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info fused_rnn/*.so .build-stamp-external
