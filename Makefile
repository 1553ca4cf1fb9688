# The set-up-and-run commands of the README. Each target creates .venv if missing, installs the
# pinned dependencies once, builds the extension fastattn._C (incrementally) and runs.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.fastattn-deps
export MAX_JOBS ?= 2
export FASTATTN_CUDA_ARCHS ?= 8.0;9.0
# make builds the extension where it runs: CPU kernels for this CPU (-march=native), which the
# benchmark gate's baseline assumes. `pip install .` builds portable (AVX2) code instead;
# FASTATTN_PORTABLE=1 or FASTATTN_CPU_ARCH=... override this (build_support.cpu_arch).
export FASTATTN_NATIVE ?= 1
# Two workers: the interpreter tests are single-threaded Python.
PYTEST_ARGS ?= -n 2

.PHONY: venv build test fuzz test-compat test-gpu bench bench-ci bench-baseline static asan clean

venv: $(DEPS_STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements.txt setup.py | $(VPY)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	# Editable install of the Python package only; the extension is built in place below.
	FASTATTN_SKIP_EXTENSION=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(DEPS_STAMP)

# ninja recompiles only what changed; --force makes setuptools hand every build to ninja
# (its own check ignores headers).
build: $(DEPS_STAMP)
	$(VPY) setup.py -q build_ext --inplace --force
	$(VPY) -c "import fastattn, json; print('fastattn build:', json.dumps(fastattn.build_info()))"

# Inductor's on-disk caches would outlive a change to a fake implementation: keep tests honest.
test: build
	TRITON_INTERPRET=1 TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $(VPY) -m pytest tests $(PYTEST_ARGS)

# Every seeded random-configuration fuzz test (tests/test_fuzz_*.py) with FUZZ_CONFIGS random
# configs per test on the cpu and torch backends (the Triton interpreter runs one Python program
# per row: its configs run in `make test`). Another seed: `FUZZ_SEED=7 make fuzz`.
FUZZ_SEED ?= 0
FUZZ_CONFIGS ?= 1000
fuzz: build
	FASTATTN_FUZZ_CONFIGS=$(FUZZ_CONFIGS) FASTATTN_FUZZ_SEED=$(FUZZ_SEED) TRITON_INTERPRET=1 \
	TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 $(VPY) -m pytest tests/test_fuzz_*.py \
	-k "not triton and not cuda" $(PYTEST_ARGS)

# The interpreter + CPU suite on the oldest supported torch/triton (requirements-compat.txt),
# in its own venv under .compat/ with a `pip install .` of fastattn (scripts/test_compat.sh).
test-compat:
	@bash scripts/test_compat.sh

# On a CUDA machine with a ready Python (no venv, no network): PYTHON=python3 make test-gpu.
# Triton parity on CUDA tensors first, then the extension for this GPU, then the rest of the
# suite, all without the interpreter. No GPU: one line, exit 2 (scripts/test_gpu.sh).
test-gpu:
	@PYTHON="$(PYTHON)" MAX_JOBS="$${TEST_GPU_JOBS:-$$(nproc)}" bash scripts/test_gpu.sh

bench: build
	$(VPY) -m benchmarks

bench-ci: build
	$(VPY) -m benchmarks.gate

bench-baseline: build
	$(VPY) -m benchmarks.gate --update-baseline

static: build
	$(VPY) -m benchmarks.gpu_static

asan: $(DEPS_STAMP)
	bash scripts/asan.sh

clean:
	rm -rf build fastattn/_C*.so
