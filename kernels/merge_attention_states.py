"""Merge two partial attention results (out, lse) over disjoint key sets, as a Triton kernel.

    lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

computed in fp32 around the larger lse; a row where both lse are -inf (no keys on either side)
gives lse = -inf and out = 0. One program owns BLOCK_M rows of (rows, D).
"""

import torch
import triton
import triton.language as tl

from ._compat import launch
from ._support import dtype_device_reason

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _merge_kernel(
    out_a_ptr, out_b_ptr, lse_a_ptr, lse_b_ptr, out_ptr, lse_ptr,
    ROWS, D, S1, S2,                        # out viewed as (S0, S1, S2, D): rows = S0 * S1 * S2
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3,  # strides of out_a / out_b (any layout)
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    in_rows = rows < ROWS
    lse_a = tl.load(lse_a_ptr + rows, mask=in_rows, other=float("-inf"))     # lse contiguous
    lse_b = tl.load(lse_b_ptr + rows, mask=in_rows, other=float("-inf"))
    m = tl.maximum(lse_a, lse_b)
    empty = m == float("-inf")
    m_safe = tl.where(empty, 0.0, m)
    ea = tl.exp(lse_a - m_safe)   # exp(-inf) = 0 on an empty side
    eb = tl.exp(lse_b - m_safe)
    total = ea + eb
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total)))
    tl.store(lse_ptr + rows, lse, mask=in_rows)

    i2 = rows % S2
    i1 = (rows // S2) % S1
    i0 = rows // (S1 * S2)
    a_row = i0 * sa0 + i1 * sa1 + i2 * sa2                                   # (BLOCK_M,)
    b_row = i0 * sb0 + i1 * sb1 + i2 * sb2
    wa = (ea * inv)[:, None]
    wb = (eb * inv)[:, None]
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)                                    # (BLOCK_D,)
        mask = in_rows[:, None] & (cols < D)[None, :]
        a = tl.load(out_a_ptr + a_row[:, None] + cols[None, :] * sa3, mask=mask, other=0.0)
        b = tl.load(out_b_ptr + b_row[:, None] + cols[None, :] * sb3, mask=mask, other=0.0)
        y = wa * a.to(tl.float32) + wb * b.to(tl.float32)                    # (BLOCK_M, BLOCK_D)
        tl.store(out_ptr + rows[:, None] * D + cols[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=mask)


def _as_4d(t):
    """View of t (..., D) as (S0, S1, S2, D) without copying (merging leading dims if >4d)."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    if t.dim() > 4:
        t = t.reshape(-1, *t.shape[-3:])  # copies only when the leading dims cannot merge
    return t


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """(out, lse): out contiguous in out_a's dtype, lse fp32 contiguous (backend contract)."""
    shape = out_a.shape
    d = shape[-1]
    out = torch.empty(shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(shape[:-1], dtype=torch.float32, device=out_a.device)
    rows = lse.numel()
    if rows == 0:
        return out, lse
    a4, b4 = _as_4d(out_a), _as_4d(out_b)
    block_d = min(triton.next_power_of_2(max(d, 1)), 128)
    block_m = max(1, min(64, 1024 // block_d))  # 1024-element tiles: 8 per thread, no spills
    grid = (triton.cdiv(rows, block_m),)
    launch(_merge_kernel)[grid](
        a4, b4, lse_a.contiguous(), lse_b.contiguous(), out, lse,
        rows, d, a4.shape[1], a4.shape[2],
        *a4.stride(), *b4.stride(),
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return out, lse


def unsupported(op, **case):
    """Reason this backend cannot run the case, or None (dtype/device of out_a)."""
    if op != "merge_attention_states":
        return f"unknown op {op!r}"
    return dtype_device_reason(case, ("out_a",), _DTYPES)


def static_variants(arch):
    """Configurations the launcher picks (BLOCK_D = next power of two of the head dim up to
    128, BLOCK_M = 1024 / BLOCK_D up to 64), unit last-dim strides; fp32 and bf16 (fp16 only
    differs in the conversions). sm_80/sm_90: 95-126 registers, no spills."""
    from .static_variant import StaticVariant
    del arch  # the same configurations on sm_80 and sm_90
    out = []
    for t in ("fp32", "bf16"):
        for block_d in (16, 64, 128):
            block_m = max(1, min(64, 1024 // block_d))
            sig = {"out_a_ptr": f"*{t}", "out_b_ptr": f"*{t}", "lse_a_ptr": "*fp32",
                   "lse_b_ptr": "*fp32", "out_ptr": f"*{t}", "lse_ptr": "*fp32"}
            sig.update({k: "i32" for k in ("ROWS", "D", "S1", "S2", "sa0", "sa1", "sa2",
                                           "sb0", "sb1", "sb2")})
            consts = {"sa3": 1, "sb3": 1, "BLOCK_M": block_m, "BLOCK_D": block_d}
            sig.update({k: "constexpr" for k in consts})
            out.append(StaticVariant(_merge_kernel, "merge_attention_states",
                                     f"{t} BM={block_m} BD={block_d}", sig, consts, num_warps=4))
    return out
