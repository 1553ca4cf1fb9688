"""Linear on the triton backend: none. A decode step's skinny products on CUDA are cuBLAS's
GEMV/GEMM territory (the torch backend), which a Triton kernel would only match; `auto` runs
CUDA tensors there. The module exists so that asking the triton backend for linear by name
gets this reason instead of a missing-module error.
"""


def unsupported(op, **case):
    """Reason this backend cannot run the case: always."""
    del case
    if op != "linear":
        return f"unknown op {op!r}"
    return "no Triton linear kernel (on CUDA, cuBLAS through the torch backend is the GEMM)"
