"""Row-wise softmax: forward (scale, mask, causal) and backward, as Triton kernels.

One program owns one row. A row that fits in BLOCK_N (<= 8192) is loaded once; a longer row
takes an online pass (per-lane running max / running sum, so no reduction inside the loop)
followed by a pass that writes the normalised values.
"""

import torch
import triton
import triton.language as tl

from .static_variant import StaticVariant
from ._compat import launch
from ._support import assert_runnable, dtype_device_reason

# Single-block tile sizes the launcher picks from, with their warp counts; rows longer than the
# last one use the looped kernel with LOOP_BLOCK.
SINGLE_BLOCKS = ((128, 1), (256, 2), (512, 2), (1024, 4), (2048, 4), (4096, 8), (8192, 16))
LOOP_BLOCK, LOOP_WARPS = 4096, 8

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


@triton.jit
def _scores(x_row, m_row, cols, N, n_vis, stride_xn, stride_mn, scale,
            MASK_KIND: tl.constexpr):
    """fp32 scores of one block of a row; invisible columns are -inf.  # (BLOCK_N,)"""
    in_row = cols < N
    x = tl.load(x_row + cols * stride_xn, mask=in_row, other=0.0)
    # round(x * scale) as an fma with +0: a plain multiply may be contracted with the later
    # `s - m` into fma(x, scale, -m), which is exact where m is rounded, so the max column's
    # argument can be -hundreds for logits ~1e9 (an all-zero row; the CPU kernel had this bug)
    s = tl.fma(x.to(tl.float32), scale, 0.0)
    visible = cols < n_vis
    if MASK_KIND == 1:
        keep = tl.load(m_row + cols * stride_mn, mask=in_row, other=0)
        visible = visible & (keep != 0)
    if MASK_KIND == 2:
        s += tl.load(m_row + cols * stride_mn, mask=in_row, other=0.0).to(tl.float32)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(
    x_ptr, y_ptr, mask_ptr,
    M, N, L1, L2,                      # x is (L0, L1, L2, M, N) for the mask's batch dims
    stride_xr, stride_xn, stride_yr,   # x and y viewed as (rows, N)
    stride_m0, stride_m1, stride_m2, stride_mm, stride_mn,
    scale, causal,
    MASK_KIND: tl.constexpr, BLOCK_N: tl.constexpr, LOOP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = row % M
    b = row // M
    m_row = (mask_ptr + (b // (L1 * L2)) * stride_m0 + ((b // L2) % L1) * stride_m1
             + (b % L2) * stride_m2 + i * stride_mm)
    x_row = x_ptr + row * stride_xr
    y_row = y_ptr + row * stride_yr
    # causal (top-left): column j of row i is visible iff j <= i
    n_vis = tl.where(causal != 0, tl.minimum(i + 1, N), N)
    cols = tl.arange(0, BLOCK_N)                                        # (BLOCK_N,)
    if not LOOP:
        s = _scores(x_row, m_row, cols, N, n_vis, stride_xn, stride_mn, scale, MASK_KIND)
        m = tl.max(s, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)      # fully masked row: every exp is 0
        e = tl.exp2((s - m) * 1.4426950408889634)    # exp(t) = exp2(t * log2(e))
        denom = tl.sum(e, axis=0)
        inv = 1.0 / tl.where(denom > 0, denom, float("inf"))  # empty row -> 0
        tl.store(y_row + cols, (e * inv).to(y_ptr.dtype.element_ty), mask=cols < N)
    else:
        m_vec = tl.full((BLOCK_N,), float("-inf"), tl.float32)         # per-lane running max
        l_vec = tl.zeros((BLOCK_N,), tl.float32)                       # per-lane running sum
        for start in range(0, n_vis, BLOCK_N):       # columns >= n_vis are all invisible
            s = _scores(x_row, m_row, start + cols, N, n_vis, stride_xn, stride_mn, scale,
                        MASK_KIND)
            m_new = tl.maximum(m_vec, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_vec = (l_vec * tl.exp2((m_vec - m_safe) * 1.4426950408889634)
                     + tl.exp2((s - m_safe) * 1.4426950408889634))
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.sum(l_vec * tl.exp2((m_vec - m) * 1.4426950408889634), axis=0)
        inv = 1.0 / tl.where(denom > 0, denom, float("inf"))  # empty row -> 0
        for start in range(0, N, BLOCK_N):
            c = start + cols
            s = _scores(x_row, m_row, c, N, n_vis, stride_xn, stride_mn, scale, MASK_KIND)
            y = tl.exp2((s - m) * 1.4426950408889634) * inv
            tl.store(y_row + c, y.to(y_ptr.dtype.element_ty), mask=c < N)


@triton.jit
def _softmax_bwd_kernel(
    dy_ptr, y_ptr, dx_ptr, N,
    stride_dyr, stride_dyn, stride_yr, stride_yn, stride_dxr,
    scale,
    BLOCK_N: tl.constexpr, LOOP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dy_row = dy_ptr + row * stride_dyr
    y_row = y_ptr + row * stride_yr
    dx_row = dx_ptr + row * stride_dxr
    cols = tl.arange(0, BLOCK_N)                                        # (BLOCK_N,)
    if not LOOP:
        ok = cols < N
        dy = tl.load(dy_row + cols * stride_dyn, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_row + cols * stride_yn, mask=ok, other=0.0).to(tl.float32)
        dot = tl.sum(dy * y, axis=0)
        tl.store(dx_row + cols, (scale * y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=ok)
    else:
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            ok = c < N
            dy = tl.load(dy_row + c * stride_dyn, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_row + c * stride_yn, mask=ok, other=0.0).to(tl.float32)
            acc += dy * y
        dot = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            ok = c < N
            dy = tl.load(dy_row + c * stride_dyn, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_row + c * stride_yn, mask=ok, other=0.0).to(tl.float32)
            tl.store(dx_row + c, (scale * y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=ok)


def _block_config(n):
    """(BLOCK_N, num_warps, loop) for rows of length n."""
    for block, warps in SINGLE_BLOCKS:
        if n <= block:
            return block, warps, False
    return LOOP_BLOCK, LOOP_WARPS, True


def _collapse_batch(sizes, strides):
    """Merge adjacent batch dims that are one strided dim; drop size-1 dims."""
    out = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if out and out[-1][1] == stride * size:
            out[-1] = (out[-1][0] * size, stride)
        else:
            out.append((size, stride))
    return out


def _mask_view(mask, x_dtype):
    """(mask tensor, kind, [(size, stride)] * 3 batch dims) as the kernel reads it."""
    if mask.dtype == torch.bool:
        mask, kind = mask.view(torch.uint8), MASK_BOOL
    else:
        if mask.dtype not in (x_dtype, torch.float32):
            # convert only the stored values: broadcast (stride-0) dims stay broadcast
            shape, compact = mask.shape, mask
            for d in range(mask.dim()):
                if mask.stride(d) == 0:
                    compact = compact.narrow(d, 0, 1)
            mask = compact.to(torch.float32).expand(shape)
        kind = MASK_FLOAT
    if (mask.shape[-1] - 1) * abs(mask.stride(-1)) >= 2**31:   # 32-bit in-row offsets
        mask = mask.contiguous()
    batch = _collapse_batch(mask.shape[:-2], mask.stride()[:-2])
    if len(batch) > 3:     # a broadcast pattern the kernel cannot index: materialise it
        mask = mask.contiguous()
        batch = _collapse_batch(mask.shape[:-2], mask.stride()[:-2])
    batch = [(1, 0)] * (3 - len(batch)) + batch
    return mask, kind, batch


def _rows(t):
    """View t as (rows, N) without a copy when its layout allows. Offsets within a row are
    32-bit in the kernel (rows are 64-bit), so a row spanning 2^31 elements is made compact."""
    t = t.reshape(-1, t.shape[-1])
    return t if (t.shape[1] - 1) * abs(t.stride(1)) < 2**31 else t.contiguous()


def softmax_forward(x, *, scale=None, mask=None, causal=False):
    """softmax(x * scale (+ float mask)) over the last dim; bool mask True = keep.
    Arguments are validated by fastattn.softmax; here they are only asserted."""
    assert x.dtype in _DTYPES and (x.dim() >= 2 or not causal)
    assert_runnable(x)
    scale = 1.0 if scale is None else float(scale)
    n = x.shape[-1]
    m_rows = x.shape[-2] if x.dim() >= 2 else 1
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2, y2 = _rows(x), y.view(-1, n)
    if mask is None:
        mask_t, kind, batch, m_strides = x2, MASK_NONE, [(1, 0)] * 3, (0, 0)
    else:
        assert tuple(mask.shape) == tuple(x.shape), "mask must be expanded to x's shape"
        if x.dim() < 2:
            mask = mask.unsqueeze(0)
        mask_t, kind, batch = _mask_view(mask, x.dtype)
        m_strides = (mask_t.stride(-2), mask_t.stride(-1))
    block, warps, loop = _block_config(n)
    launch(_softmax_fwd_kernel)[(x2.shape[0],)](
        x2, y2, mask_t, m_rows, n, batch[1][0], batch[2][0],
        x2.stride(0), x2.stride(1), y2.stride(0),
        batch[0][1], batch[1][1], batch[2][1], m_strides[0], m_strides[1],
        scale, int(bool(causal)),
        MASK_KIND=kind, BLOCK_N=block, LOOP=loop, num_warps=warps)
    return y


def softmax_backward(dy, y, *, scale=None):
    """dx = scale * y * (dy - sum(dy * y, -1))."""
    assert dy.shape == y.shape and y.dtype in _DTYPES
    assert_runnable(y)
    scale = 1.0 if scale is None else float(scale)
    n = y.shape[-1]
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return dx
    dy2, y2, dx2 = _rows(dy), _rows(y), dx.view(-1, n)
    block, warps, loop = _block_config(n)
    launch(_softmax_bwd_kernel)[(y2.shape[0],)](
        dy2, y2, dx2, n, dy2.stride(0), dy2.stride(1), y2.stride(0), y2.stride(1),
        dx2.stride(0), scale, BLOCK_N=block, LOOP=loop, num_warps=warps)
    return dx


def unsupported(op, **case):
    """Reason this backend cannot run the case, or None. Keys looked at: dtype, device and any
    tensor argument (x, y, dy)."""
    if op not in ("softmax_forward", "softmax_backward", "softmax"):
        return f"unknown op {op!r}"
    return dtype_device_reason(case, ("x", "y", "dy"), _DTYPES)


def static_variants(arch):
    """Every (dtype, mask kind, block) configuration the launchers can pick."""
    del arch  # the same configurations on sm_80 and sm_90
    out = []
    blocks = [(b, w, False) for b, w in SINGLE_BLOCKS] + [(LOOP_BLOCK, LOOP_WARPS, True)]
    for dtype in _DTYPES:
        t = _TL_NAME[dtype]
        masks = [("none", MASK_NONE, t), ("bool", MASK_BOOL, "u8"), ("float", MASK_FLOAT, t)]
        if dtype != torch.float32:
            masks.append(("float32", MASK_FLOAT, "fp32"))
        for block, warps, loop in blocks:
            tag = f"{'loop' if loop else 'single'} BN={block} w={warps}"
            for mname, kind, mty in masks:
                sig = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "mask_ptr": f"*{mty}"}
                sig.update({k: "i32" for k in ("M", "N", "L1", "L2")})
                # strides as the JIT passes them: i32, and unit strides specialised to 1
                sig.update({k: "i32" for k in ("stride_xr", "stride_yr", "stride_m0", "stride_m1",
                                                "stride_m2", "stride_mm")})
                sig.update({"scale": "fp32", "causal": "i32"})
                consts = {"stride_xn": 1, "stride_mn": 1, "MASK_KIND": kind, "BLOCK_N": block,
                          "LOOP": loop}
                sig.update({k: "constexpr" for k in consts})
                out.append(StaticVariant(
                    _softmax_fwd_kernel, "softmax_fwd", f"{t} mask={mname} {tag}", sig, consts,
                    num_warps=warps))
            sig = {"dy_ptr": f"*{t}", "y_ptr": f"*{t}", "dx_ptr": f"*{t}", "N": "i32"}
            sig.update({k: "i32" for k in ("stride_dyr", "stride_yr", "stride_dxr")})
            sig["scale"] = "fp32"
            consts = {"stride_dyn": 1, "stride_yn": 1, "BLOCK_N": block, "LOOP": loop}
            sig.update({k: "constexpr" for k in consts})
            out.append(StaticVariant(_softmax_bwd_kernel, "softmax_bwd", f"{t} {tag}", sig,
                                     consts, num_warps=warps))
    return out
