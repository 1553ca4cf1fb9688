#!/usr/bin/env bash
# Build fastattn._C's CPU kernels with AddressSanitizer in a throw-away copy of the repository
# (the normal in-place build is left alone) and run the extension's CPU tests under it.
#
#   scripts/asan.sh [extra pytest args]        e.g. scripts/asan.sh -k rotary
#
# Env: PYTHON (default .venv/bin/python), MAX_JOBS (default 2), ASAN_TESTS (test files),
#      ASAN_DIR=path builds there and keeps it (a rerun then rebuilds only what changed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
# test_attention_regressions.py: issue #12's shapes (windows that leave trailing query rows
# keyless, MultiHeadAttention's weights with window (0, -1)), each in fresh interpreters that
# inherit LD_PRELOAD and load this sanitized copy.
TESTS="${ASAN_TESTS:-tests/test_extension.py tests/test_attention_cpu.py tests/test_softmax_cpu.py tests/test_layer_norm_cpu.py tests/test_rotary_cpu.py tests/test_cpu_streaming.py tests/test_varlen_attention.py tests/test_kvcache_attention.py tests/test_attention_regressions.py tests/test_alibi_cpu.py tests/test_fuzz_alibi_cpu.py tests/test_swiglu.py tests/test_linear.py tests/test_fuzz_linear.py tests/test_eager_fast_path.py}"
if [[ -n "${ASAN_DIR:-}" ]]; then
  mkdir -p "$ASAN_DIR"
  WORK="$(cd "$ASAN_DIR" && pwd)"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastattn-asan.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
fi

# Sources only: no virtual env, build tree, built extension or git data.
tar -C "$ROOT" --exclude=./.venv --exclude=./.compat --exclude=./build --exclude=./.git --exclude='*.so' \
    --exclude='__pycache__' -cf - . | tar -C "$WORK" -xf -
cd "$WORK"

echo "fastattn asan: building in $WORK"
FASTATTN_ASAN=1 FASTATTN_SKIP_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; echo "fastattn asan: build failed"; exit 1; }

# libstdc++ is preloaded too: otherwise ASan's __cxa_throw interceptor finds no real
# __cxa_throw and aborts on the first C++ exception of a later-loaded library.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# Python's own allocations look like leaks to LSan; only memory errors are of interest.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:${ASAN_OPTIONS:-}"

# Make sure the tests load the sanitized copy, not the normal build.
"$PY" -c "
import json, torch, fastattn, fastattn._C
assert fastattn.__file__.startswith('$WORK'), fastattn.__file__
assert json.loads(torch.ops.fastattn_kernels.build_info())['asan'], 'extension built without ASan'
print('fastattn asan: testing', fastattn._C.__file__)
"
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider $TESTS "$@"
echo "fastattn asan: clean"
