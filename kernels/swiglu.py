"""SwiGLU, out = silu(gate) * up, elementwise, as Triton kernels (forward and backward).

The tensors arrive contiguous and are read as flat arrays of n elements; one program owns
BLOCK of them. Math in fp32, one rounding to the output dtype:
    sig = 1 / (1 + exp(-g)),  out = g * sig * u
    dgate = dy * u * sig * (1 + g * (1 - sig)),  dup = dy * g * sig
For |g| past fp32's exp range exp(-g) is inf (sig = 0) or 0 (sig = 1): no NaN, the limits
silu(-inf) = 0 and silu(+inf) = g.
"""

import torch
import triton
import triton.language as tl

from .static_variant import StaticVariant
from ._compat import launch
from ._support import assert_runnable, dtype_device_reason

BLOCK, WARPS = 1024, 4

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)      # (BLOCK,)
    ok = offs < n
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(out_ptr + offs, (g * sig * u).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)      # (BLOCK,)
    ok = offs < n
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(dup_ptr + offs, (dy * g * sig).to(dup_ptr.dtype.element_ty), mask=ok)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgate_ptr + offs, dg.to(dgate_ptr.dtype.element_ty), mask=ok)


def _flat(t):
    return t.contiguous().view(-1)


def swiglu_forward(gate, up):
    """silu(gate) * up; gate and up of one shape and dtype (validated by fastattn.swiglu)."""
    assert gate.shape == up.shape and gate.dtype == up.dtype and gate.dtype in _DTYPES
    assert_runnable(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n == 0:
        return out
    launch(_swiglu_fwd_kernel)[(triton.cdiv(n, BLOCK),)](
        _flat(gate), _flat(up), out.view(-1), n, BLOCK=BLOCK, num_warps=WARPS)
    return out


def swiglu_backward(dy, gate, up):
    """-> (dgate, dup)."""
    assert dy.shape == gate.shape == up.shape and gate.dtype in _DTYPES
    assert_runnable(dy, gate, up)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n == 0:
        return dgate, dup
    launch(_swiglu_bwd_kernel)[(triton.cdiv(n, BLOCK),)](
        _flat(dy), _flat(gate), _flat(up), dgate.view(-1), dup.view(-1), n, BLOCK=BLOCK,
        num_warps=WARPS)
    return dgate, dup


def unsupported(op, **case):
    """Reason this backend cannot run the case, or None. Keys looked at: dtype, device and any
    tensor argument (gate, up, dy)."""
    if op not in ("swiglu", "swiglu_forward", "swiglu_backward"):
        return f"unknown op {op!r}"
    return dtype_device_reason(case, ("gate", "up", "dy"), _DTYPES)


def static_variants(arch):
    """Every configuration the launchers can pick: one tile per dtype and direction."""
    del arch  # the same configurations on sm_80 and sm_90
    out = []
    for dtype in _DTYPES:
        t = _TL_NAME[dtype]
        consts = {"BLOCK": BLOCK}
        tag = f"{t} BLOCK={BLOCK} w={WARPS}"
        sig = {"gate_ptr": f"*{t}", "up_ptr": f"*{t}", "out_ptr": f"*{t}", "n": "i32",
               "BLOCK": "constexpr"}
        out.append(StaticVariant(_swiglu_fwd_kernel, "swiglu_fwd", tag, sig, consts,
                                 num_warps=WARPS))
        sig = {"dy_ptr": f"*{t}", "gate_ptr": f"*{t}", "up_ptr": f"*{t}", "dgate_ptr": f"*{t}",
               "dup_ptr": f"*{t}", "n": "i32", "BLOCK": "constexpr"}
        out.append(StaticVariant(_swiglu_bwd_kernel, "swiglu_bwd", tag, sig, consts,
                                 num_warps=WARPS))
    return out
