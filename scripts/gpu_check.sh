#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (no network; a ready Python with torch,
# triton and pytest). Sized for a 15-minute device budget, aiming at under 8 minutes.
#
#   scripts/gpu_check.sh OUTDIR            (env: PYTHON, default python3)
#
# Writes into OUTDIR, in this order:
#   parity.txt       the Triton parity verdict on CUDA tensors (first stage of make test-gpu,
#                    before the extension build; written as soon as it is known)
#   test-gpu.log     the whole make test-gpu run; tests.txt its verdict line
#   gpu_bench.json   benchmarks.gpu_bench: the CLI's JSON schema plus GPU fields
#   gpu_bench.txt    its short text summary
#   summary.txt      machine, verdicts, timings, then gpu_bench.txt
#   nvidia-smi.txt   the GPU as the driver sees it (when nvidia-smi exists)
# Exit: 2 without a GPU (one line), 1 when a test stage failed or a benchmark mismatched,
# else 0. Stage limits (seconds, env): GPU_CHECK_STAGE_S (each pytest stage, default 200),
# GPU_CHECK_BENCH_S (benchmark budget, default 150).
set -uo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: scripts/gpu_check.sh OUTDIR" >&2
  exit 64
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY (or no torch); nothing run"
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

# 1. make test-gpu: Triton parity first (its verdict lands in parity.txt), then the build and
#    the rest of the suite. Each pytest stage is capped so the benchmarks still get their turn.
echo "gpu_check [$(elapsed) s]: make test-gpu (log: $OUT/test-gpu.log)"
echo "pending: make test-gpu has not reported the parity stage yet" >"$OUT/parity.txt"
export PYTHON="$PY" FASTATTN_PARITY_FILE="$OUT/parity.txt"
export TEST_GPU_STAGE_TIMEOUT="${GPU_CHECK_STAGE_S:-200}"
if command -v make >/dev/null; then
  make --no-print-directory test-gpu >"$OUT/test-gpu.log" 2>&1
else                                  # what make test-gpu runs
  MAX_JOBS="${TEST_GPU_JOBS:-$(nproc)}" bash scripts/test_gpu.sh >"$OUT/test-gpu.log" 2>&1
fi
tests=$?
tests_s=$(elapsed)
echo "make test-gpu exit $tests after $tests_s s ($(tail -1 "$OUT/test-gpu.log"))" >"$OUT/tests.txt"
echo "gpu_check [$tests_s s]: $(cat "$OUT/parity.txt")"
echo "gpu_check [$tests_s s]: $(cat "$OUT/tests.txt")"

# 2. benchmarks (the extension built by make test-gpu serves the cuda backend's records)
echo "gpu_check [$(elapsed) s]: benchmarks (budget ${GPU_CHECK_BENCH_S:-150} s)"
"$PY" -m benchmarks.gpu_bench --out "$OUT" --budget-s "${GPU_CHECK_BENCH_S:-150}" \
  >"$OUT/gpu_bench.log" 2>&1
bench=$?
[[ -f "$OUT/gpu_bench.txt" ]] || echo "gpu_bench failed (exit $bench): $(tail -3 "$OUT/gpu_bench.log")" \
  >"$OUT/gpu_bench.txt"

{
  echo "fastattn GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PY" -c "import torch, triton; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__)"
  echo "parity: $(cat "$OUT/parity.txt")"
  echo "tests:  $(cat "$OUT/tests.txt")"
  echo "benchmarks: exit $bench; total $(elapsed) s"
  echo
  cat "$OUT/gpu_bench.txt"
} >"$OUT/summary.txt"
echo "gpu_check [$(elapsed) s]: done; $OUT/summary.txt"
[[ $tests -eq 0 && $bench -eq 0 ]] || exit 1
