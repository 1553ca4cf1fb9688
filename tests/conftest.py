"""Shared test harness: backend fixture, markers, interpreter bf16 fixes.

Tolerances (the DESIGN.md 2x rule and every hand-picked bound) live in tests/tolerances.py.
"""

import os

import pytest
import torch

import fastattn
from fastattn import _backend
from fastattn.kernels._compat import interpreting


# `make test-gpu` (scripts/test_gpu.sh) sets FASTATTN_TEST_GPU=1: the Triton tests must then run
# compiled on CUDA tensors (DEVICE / backend_device below pick "cuda" when the interpreter is off).
TEST_GPU = os.environ.get("FASTATTN_TEST_GPU") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")
    if TEST_GPU and (interpreting() or not torch.cuda.is_available()):
        pytest.exit("FASTATTN_TEST_GPU=1 needs a CUDA GPU and TRITON_INTERPRET unset", returncode=2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; the same behaviour is covered on the "
                                       "CPU by the interpreter / C++ backend tests")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter):
    if TEST_GPU:
        terminalreporter.write_line(
            f"fastattn: Triton kernels compiled for {torch.cuda.get_device_name()} "
            f"(interpreter off, tensors on {backend_device('triton')})")
    skipped = terminalreporter.stats.get("skipped", [])
    gpu_only = [r for r in skipped if "needs a CUDA GPU" in str(r.longrepr)]
    if gpu_only:
        terminalreporter.write_line(
            f"fastattn: {len(gpu_only)} GPU-only tests skipped (no CUDA device here); "
            f"{len(skipped) - len(gpu_only)} other skips")


# ------------------------------------------------------------------ interpreter bf16 tl.dot fix

def _interpreter_modules():
    """(numpy, triton.language, triton.runtime.interpreter) when running interpreted, else None."""
    if not interpreting():
        return None
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return None
    return np, tl, interpreter


def _patch_interpreter_bf16_dot():
    """The Triton interpreter keeps bf16 as raw uint16 and multiplies those in tl.dot. Upcast
    bf16 operands to fp32 before the matmul (test-harness fix; kernels stay unchanged)."""
    mods = _interpreter_modules()
    if mods is None:
        return
    np, tl, interpreter = mods
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_fastattn_bf16_fix", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def up(t):
                if t.dtype.scalar != tl.bfloat16:
                    return t.data.astype(np.float32)
                return interpreter._convert_float(t.data, tl.bfloat16, tl.float32,
                                                  None).view(np.float32)
            return interpreter.TensorHandle(np.matmul(up(a), up(b), dtype=np.float32)
                                            .astype(d.data.dtype) + d.data, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._fastattn_bf16_fix = True
    builder.create_dot = create_dot


def _patch_interpreter_bf16_rounding():
    """The interpreter casts fp32 -> bf16 by truncating the mantissa; GPUs round to nearest
    even. Truncation makes every bf16 kernel output up to one ulp low, so use torch's
    (round-to-nearest-even) conversion in the interpreter's cast (test-harness fix)."""
    mods = _interpreter_modules()
    if mods is None:
        return
    np, tl, interpreter = mods
    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_fastattn_bf16_fix", False):
        return
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar == tl.float32:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(bits.view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._fastattn_bf16_fix = True
    builder.cast_impl = cast_impl


_patch_interpreter_bf16_dot()
_patch_interpreter_bf16_rounding()


# ------------------------------------------------------------------ backends

def backend_device(name):
    """The device a backend's parity tests run on here."""
    if name == "cuda":
        return "cuda"
    if name == "triton":
        return "cpu" if interpreting() else "cuda"
    return "cpu"


def _testable_backends():
    names = []
    for name in ("triton", "cpu", "cuda", "torch"):
        if _backend.unavailable_reason(name, backend_device(name)) is None:
            names.append(name)
    return names


TESTABLE_BACKENDS = _testable_backends()


@pytest.fixture(params=TESTABLE_BACKENDS)
def backend(request):
    """Runs the test once per backend available here, inside fastattn.use_backend(name).
    Yields the backend name; use `backend_device(name)` for the tensors' device."""
    with fastattn.use_backend(request.param):
        yield request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


# ------------------------------------------------------------------ copies for references

def upcast(*tensors):
    """fp32 copies (detached, requiring grad where the original did) for the reference."""
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t)
            continue
        c = t.detach().float()
        out.append(c.requires_grad_(t.requires_grad))
    return out


def lowp_copies(*tensors):
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t)
            continue
        out.append(t.detach().clone().requires_grad_(t.requires_grad))
    return out


def rerun_tests(files, select, **env):
    """Run pytest on `files` (in tests/) with `-k select` in a fresh process whose environment
    adds `env`, and assert that it ran tests and they all passed: for behaviour chosen once
    per process (the CPU kernels' GEMM engine, their streaming threshold)."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         *files, "-k", select],
        env=dict(os.environ, **env), capture_output=True, text=True, timeout=900, cwd=here)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-500:]
