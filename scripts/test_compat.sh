#!/usr/bin/env bash
# make test-compat: the interpreter + CPU suite on the oldest supported stack.
#
# Builds a second venv from requirements-compat.txt (torch/triton at the floor of the range
# setup.py declares), installs fastattn into it the way a user does (`pip install .`, build
# isolation on, no requirements file; CPU kernels only, portable), checks that it imports
# and that build_info() names that build, then runs tests/ with TRITON_INTERPRET=1 against it
# in a copy of the sources (the repository's own in-place build is left alone).
#
# Everything lives under .compat/ (gitignored): wheels/ (downloaded once; later runs install
# offline), venv/, src/. Env: PYTHON (interpreter for the venv, default python3), MAX_JOBS
# (default 2), COMPAT_DIR (default .compat), PYTEST_ARGS (default -n 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${COMPAT_DIR:-$ROOT/.compat}"
REQ="$ROOT/requirements-compat.txt"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-2}"
# CPU kernels only: torch 2.6 wheels are CUDA 12 builds, the toolkit here may be another CUDA;
# exported so tests/test_build.py knows a CPU-only build was asked for.
export FASTATTN_SKIP_CUDA_BUILD=1
start=$(date +%s)
say() { echo "test-compat [$(( $(date +%s) - start )) s]: $*"; }
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
req_hash="$(sha256sum "$REQ" | cut -c1-16)"

# 1. wheels, downloaded once per requirements-compat.txt
if [[ "$(cat "$DIR/wheels/.stamp" 2>/dev/null)" != "$req_hash" ]]; then
  say "downloading the wheels of requirements-compat.txt into $DIR/wheels"
  mkdir -p "$DIR/wheels"
  "$PY" -m pip download -q -d "$DIR/wheels" -r "$REQ"
  echo "$req_hash" > "$DIR/wheels/.stamp"
fi
PIP_OFFLINE=(--no-index --find-links "$DIR/wheels")

# 2. the venv, rebuilt when requirements-compat.txt changes
VPY="$DIR/venv/bin/python"
if [[ "$(cat "$DIR/venv/.stamp" 2>/dev/null)" != "$req_hash" ]]; then
  say "creating $DIR/venv"
  rm -rf "$DIR/venv"
  "$PY" -m venv "$DIR/venv"
  "$VPY" -m pip install -q "${PIP_OFFLINE[@]}" -r "$REQ"
  echo "$req_hash" > "$DIR/venv/.stamp"
fi
say "$("$VPY" -c 'import torch, triton, numpy; print(f"torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")')"

# 3. a copy of the sources (its build/ kept, so a rerun recompiles only what changed)
mkdir -p "$DIR/src"
find "$DIR/src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then   # tracked + untracked, not ignored
  (cd "$ROOT" && git ls-files -co --exclude-standard -z \
     | tar --null --ignore-failed-read -T - -cf -) | tar -C "$DIR/src" -xf -
else
  tar -C "$ROOT" --exclude=./.venv --exclude=./.compat --exclude=./build --exclude=./.git \
      --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' -cf - . | tar -C "$DIR/src" -xf -
fi

# 4. pip install . as a user would: isolated build, the venv's torch, portable CPU kernels
say "pip install . (CPU kernels only)"
( cd "$DIR/src" && env -u FASTATTN_CPU_ARCH -u FASTATTN_NATIVE -u FASTATTN_PORTABLE \
      "$VPY" -m pip install -q --no-deps \
      "${PIP_OFFLINE[@]}" . >"$DIR/install.log" 2>&1 ) \
  || { tail -40 "$DIR/install.log"; say "FAILED: pip install ."; exit 1; }
(cd "$DIR" && "$VPY" -c '
import json, sys, torch, fastattn
info = fastattn.build_info()
assert fastattn.__file__.startswith(sys.prefix), fastattn.__file__
assert info["extension"] and info["cpu_kernels"], info
assert info.get("torch_built") == torch.__version__.split("+")[0], info
assert info.get("cpu_arch") == "portable", info
print("test-compat: installed fastattn:", json.dumps(info))')

# The suite imports that installed fastattn (site-packages first: PYTHONSAFEPATH keeps the
# copy's fastattn/, which has no built extension, off sys.path) and the copy's benchmarks/
# and build_support (appended after site-packages by a .pth file).
site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$site/fastattn_compat_src.pth"   # a new file, never one hard-linked from another cache
echo "$DIR/src" > "$site/fastattn_compat_src.pth"
export PYTHONSAFEPATH=1
( cd "$DIR/src" && "$VPY" -c '
import sys, fastattn, benchmarks
assert fastattn.__file__.startswith(sys.prefix), fastattn.__file__
assert not benchmarks.__file__.startswith(sys.prefix), benchmarks.__file__' )

# 5. the suite, interpreted, against that build
say "pytest tests ${PYTEST_ARGS:--n 2}"
cd "$DIR/src"
set +e
# shellcheck disable=SC2086
TRITON_INTERPRET=1 TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 \
  "$VPY" -m pytest tests ${PYTEST_ARGS:--n 2} -rs --durations=15 -p no:cacheprovider | tee "$DIR/pytest.log"
rc=${PIPESTATUS[0]}
set -e
say "$(grep -c 'needs torch >=' "$DIR/pytest.log" || true) tests skipped for needing a newer torch"
say "finished with exit code $rc in $(( $(date +%s) - start )) s"
exit "$rc"
