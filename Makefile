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

# AddressSanitizer + UndefinedBehaviorSanitizer: a CPU-only copy of the extension built with them
# in build/asan, and the CPU tests run against it (the sanitizer runtimes preloaded into Python).
PYRUN := $(if $(findstring /,$(PY)),$(abspath $(PY)),$(PY))
SAN_TESTS ?= tests/test_parity.py tests/test_ops.py tests/test_module.py tests/test_reliability.py
sanitize: $(STAMP)
	rm -rf build/asan && mkdir -p build/asan
	cp -r fused_rnn tests bench csrc setup.py pyproject.toml MANIFEST.in README.md build/asan/
	rm -f build/asan/fused_rnn/_C*.so
	cd build/asan && FUSED_RNN_SANITIZE=1 FUSED_RNN_CUDA=0 $(PYRUN) setup.py -q build_ext --inplace
	cd build/asan && export PYTHONPATH=$$PWD \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:verify_asan_link_order=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 && \
	  $(PYRUN) -c "import fused_rnn._ops as o; f = o._C.__file__; print('sanitized build:', f); assert '/build/asan/' in f" && \
	  $(PYRUN) -m pytest -q -p no:cacheprovider $(SAN_TESTS) $(PYTEST_ARGS)
