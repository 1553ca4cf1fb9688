#!/usr/bin/env bash
# make test-gpu: every test on this machine's CUDA GPU, with the Triton kernels compiled for it
# (no interpreter: CUDA tensors, the production tile tables, autotuning on).
#
#   PYTHON=python3 make test-gpu          (a ready Python with torch, triton and pytest;
#                                          no venv is created and nothing is downloaded)
#
# Order: (1) one line and exit 2 when there is no CUDA GPU; (2) the Triton parity tests
# (tests/test_*_triton.py; they need no extension), whose verdict goes to $FASTATTN_PARITY_FILE
# when set (scripts/gpu_check.sh reads it early); (3) the extension built in place for this
# GPU's arch only; (4) the rest of tests/. Exit 0 only when every stage passed.
#
# Env: PYTHON (default python3), MAX_JOBS (compile jobs, default: the core count; make
#      passes TEST_GPU_JOBS or the core count, not its own MAX_JOBS of 2),
#      TEST_GPU_WORKERS (pytest-xdist workers when installed, default 4), PYTEST_ARGS (extra),
#      TEST_GPU_STAGE_TIMEOUT (seconds per pytest stage, default none),
#      FASTATTN_PARITY_FILE (write the parity verdict line there).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
# The interpreter must be off for the whole run, whatever the caller's environment says.
unset TRITON_INTERPRET
export FASTATTN_TEST_GPU=1          # tests/conftest.py: refuse to run interpreted or on CPU
start=$(date +%s)
say() { echo "test-gpu [$(( $(date +%s) - start )) s]: $*"; }

# (1) a GPU, or exit 2 in one line
arch="$("$PY" - <<'EOF' 2>/dev/null
import torch
if torch.cuda.is_available() and torch.cuda.device_count() > 0:
    major, minor = torch.cuda.get_device_capability(0)
    print(f"{major}.{minor}")
EOF
)"
status=$?
if [[ $status -ne 0 ]]; then
  echo "make test-gpu: $PY cannot import torch; use a Python with torch, triton and pytest (PYTHON=...)"
  exit 1
fi
if [[ -z "$arch" ]]; then
  echo "make test-gpu: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); nothing run"
  exit 2
fi
"$PY" -c "import triton, pytest" 2>/dev/null \
  || { echo "make test-gpu: $PY lacks triton or pytest"; exit 1; }
say "$("$PY" -c 'import torch, triton; print(f"{torch.cuda.get_device_name(0)} (sm_'"${arch/./}"'), torch {torch.__version__}, triton {triton.__version__}")')"

# pytest options that do not depend on optional plugins being installed
PYTEST=("$PY" -m pytest -ra -p no:cacheprovider)
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  PYTEST+=(-o "addopts=")             # pytest.ini's --benchmark-disable needs the plugin
  IGNORE_BENCH=(--ignore=tests/test_benchmarks.py)
  say "pytest-benchmark not installed: tests/test_benchmarks.py left out"
else
  IGNORE_BENCH=()
fi
if "$PY" -c "import xdist" 2>/dev/null; then
  PYTEST+=(-n "${TEST_GPU_WORKERS:-4}")
fi
run_stage() {   # run_stage NAME ARGS...: pytest with an optional time limit; returns its status
  local name="$1"; shift
  local limit=()
  [[ -n "${TEST_GPU_STAGE_TIMEOUT:-}" ]] && limit=(timeout "$TEST_GPU_STAGE_TIMEOUT")
  say "stage $name: pytest $*"
  # shellcheck disable=SC2086
  "${limit[@]}" "${PYTEST[@]}" "$@" ${PYTEST_ARGS:-}
}

# (2) Triton parity on CUDA tensors, before anything is built
PARITY_FILES=(tests/test_attention_triton.py tests/test_softmax_triton.py
              tests/test_layer_norm_triton.py tests/test_rotary_triton.py)
run_stage parity "${PARITY_FILES[@]}"
parity=$?
verdict="PASS"
[[ $parity -ne 0 ]] && verdict="FAIL (pytest exit $parity)"
[[ $parity -eq 124 ]] && verdict="TIMEOUT after ${TEST_GPU_STAGE_TIMEOUT:-?} s"
say "Triton parity on sm_${arch/./}: $verdict"
if [[ -n "${FASTATTN_PARITY_FILE:-}" ]]; then
  echo "triton parity on CUDA (sm_${arch/./}, autotuned, no interpreter): $verdict" \
    > "$FASTATTN_PARITY_FILE"
fi

# (3) the extension for this GPU only (CPU kernels native: built where it runs)
"$PY" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null \
  || say "ninja not found: torch builds with the slow one-file-at-a-time backend"
mkdir -p build
LOG=build/test-gpu-build.log
say "building fastattn._C for sm_${arch/./} (log: $LOG)"
FASTATTN_CUDA_ARCHS="$arch" FASTATTN_NATIVE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PY" setup.py -q build_ext --inplace >"$LOG" 2>&1
build=$?
if [[ $build -ne 0 ]]; then
  tail -30 build-gpu.log
  say "FAILED: CUDA build (log: $LOG); building the CPU kernels only so the tests run"
  FASTATTN_SKIP_CUDA_BUILD=1 FASTATTN_NATIVE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" setup.py -q build_ext --inplace >>"$LOG" 2>&1 || say "FAILED: CPU build too"
fi
say "build: $("$PY" -c 'import fastattn, json; print(json.dumps(fastattn.build_info()))')"

# (4) everything else
IGNORE_PARITY=()
for f in "${PARITY_FILES[@]}"; do IGNORE_PARITY+=(--ignore="$f"); done
run_stage suite tests "${IGNORE_PARITY[@]}" "${IGNORE_BENCH[@]}"
suite=$?

say "parity $verdict; build exit $build; suite exit $suite"
if [[ $parity -ne 0 || $build -ne 0 || $suite -ne 0 ]]; then
  exit 1
fi
say "all passed"
