# Set-up and entry points. `make test` and `make demo` work on a fresh clone.
PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
# A CUDA-enabled torch, so the CUDA kernels are compiled (with or without a GPU). For a smaller
# CPU-only set-up: make test TORCH_SPEC='torch==2.13.0' (a CPU build where one is on the index).
TORCH_SPEC ?= torch==2.14.1
export MAX_JOBS ?= 2

KERNEL_SOURCES := $(shell find csrc -type f) setup.py

.PHONY: test demo build bench info clean

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q ninja pybind11 pytest pytest-benchmark hypothesis \
		diffusers transformers accelerate safetensors numpy scipy pandas pyarrow matplotlib tqdm scikit-image pillow
	touch $@

$(VENV)/.built: $(VENV)/.deps $(KERNEL_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

info: build
	$(PY) -m diffcirc.info

test: build
	$(PY) -m diffcirc.info
	$(PY) -m pytest -q tests

DEMO_OUT ?= runs/demo

demo: build
	$(PY) -m diffcirc.info
	$(PY) -m diffcirc analyze --model bundled --out $(DEMO_OUT)

bench: build
	$(PY) -m diffcirc bench op --out runs/bench/op
	$(PY) -m pytest -q benchmarks/test_perf.py --benchmark-only

# `diffcirc bench sweep|unet --quick` from a CPU-only wheel installed into a fresh venv outside
# the checkout (its dependencies taken from $(VENV)): the package works without its source tree.
.PHONY: wheel-check
wheel-check: build
	$(PY) benchmarks/wheel_check.py --python $(PY)

# Mutation testing of the modules the study's numbers rest on (slow: not part of `make test`); e.g.
# make mutate MUTATE_ARGS='--module processor/session.py --max-per-module 20'; results in runs/mutation
.PHONY: mutate
mutate: build
	$(PY) tests/mutation/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf build *.egg-info diffcirc/_C*.so
