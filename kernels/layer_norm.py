"""LayerNorm and RMSNorm over the last dim of x (M, N), forward and backward, as Triton kernels.

Statistics in fp32; optional fused residual add (h = x + residual is normalised and returned).
Rows up to 8192 (backward: 4096) are processed as (BLOCK_M, BLOCK_N) tiles in one pass; longer rows
loop over BLOCK_N chunks. The backward writes dX and fp32 partial sums of dW/dB for each
program's group of rows into a (programs, N) buffer that a torch sum reduces (no atomics,
deterministic).
"""

import torch
import triton
import triton.language as tl

from .static_variant import StaticVariant
from ._compat import launch
from ._support import assert_runnable, dtype_device_reason

# (BLOCK_N, BLOCK_M, num_warps) for rows that fit in one tile, smallest first. The backward
# holds more per element (dy, h, two accumulators), so its tiles are smaller; these sizes keep
# every variant free of register spills (python -m benchmarks.gpu_static --only layer_norm).
FWD_TILES = ((128, 16, 8), (256, 8, 8), (512, 4, 4), (1024, 2, 4), (2048, 1, 4), (4096, 1, 8),
             (8192, 1, 16))
BWD_TILES = ((128, 4, 4), (256, 2, 4), (512, 2, 4), (1024, 1, 4), (2048, 1, 8), (4096, 1, 16))
LOOP_BLOCK, LOOP_WARPS = 4096, 16         # longer rows: forward and backward-stats chunk
DX_BLOCK, DX_WARPS = 2048, 8              # longer rows: backward dX / partial-sum chunk

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_h(x_ptr, r_ptr, h_ptr, offs, mask, HAS_RES: tl.constexpr, STORE_H: tl.constexpr):
    """h = x (+ residual), rounded to x's dtype as the returned h is, then fp32."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptr + offs, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr,
    M, N, eps,
    stride_xm, stride_rm, stride_ym, stride_hm,
    RMS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    if not LOOP:
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)       # (BLOCK_M,)
        row_ok = rows < M
        col_ok = cols < N
        ok = row_ok[:, None] & col_ok[None, :]                            # (BLOCK_M, BLOCK_N)
        h = _load_h(x_ptr + rows[:, None] * stride_xm, r_ptr + rows[:, None] * stride_rm,
                    h_ptr + rows[:, None] * stride_hm, cols[None, :], ok, HAS_RES, True)
        if RMS:
            xc = h
        else:
            mean = tl.sum(h, axis=1) / N                                  # (BLOCK_M,)
            xc = tl.where(ok, h - mean[:, None], 0.0)
            tl.store(mean_ptr + rows, mean, mask=row_ok)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)           # (BLOCK_M,)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)                 # (BLOCK_N,) fp32
        y = xc * rstd[:, None] * w[None, :]
        if not RMS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        row = pid.to(tl.int64)                                             # one row per program
        x_row = x_ptr + row * stride_xm
        r_row = r_ptr + row * stride_rm
        h_row = h_ptr + row * stride_hm
        # pass 1: shifted sums (shift = the row's first value) keep the variance accurate
        shift = tl.sum(_load_h(x_row, r_row, h_row, cols, cols < 1, HAS_RES, False), axis=0)
        if RMS:
            shift = 0.0
        acc = tl.zeros((BLOCK_N,), tl.float32)
        acc2 = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            ok = c < N
            d = tl.where(ok, _load_h(x_row, r_row, h_row, c, ok, HAS_RES, True) - shift, 0.0)
            acc += d
            acc2 += d * d
        mean_d = tl.sum(acc, axis=0) / N
        if RMS:
            var = tl.sum(acc2, axis=0) / N
        else:
            var = tl.maximum(tl.sum(acc2, axis=0) / N - mean_d * mean_d, 0.0)
            tl.store(mean_ptr + row, shift + mean_d)
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(rstd_ptr + row, rstd)
        # pass 2: recompute h from the inputs (no read-after-write of h across threads)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            ok = c < N
            h = _load_h(x_row, r_row, h_row, c, ok, HAS_RES, False)
            w = tl.load(w_ptr + c, mask=ok, other=0.0)
            if RMS:
                y = h * rstd * w
            else:
                y = (h - (shift + mean_d)) * rstd * w + tl.load(b_ptr + c, mask=ok, other=0.0)
            tl.store(y_ptr + row * stride_ym + c, y.to(y_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _norm_bwd_kernel(
    dy_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, dh_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    M, N, rows_per_prog,
    stride_dym, stride_hm, stride_dhm, stride_dxm,
    RMS: tl.constexpr, HAS_DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows that fit one tile: dX, and this program's partial dW/dB over its rows."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)                     # (BLOCK_N,) fp32
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)                                 # (BLOCK_M,)
        row_ok = rows < row_end
        ok = row_ok[:, None] & col_ok[None, :]                            # (BLOCK_M, BLOCK_N)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=ok,
                     other=0.0).to(tl.float32)
        h = tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(ok, (h - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N                               # (BLOCK_M,)
        if RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(dh_ptr + rows[:, None] * stride_dhm + cols[None, :], mask=ok,
                          other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw_acc += dy * xhat
        if not RMS:
            db_acc += dy
    part = pid.to(tl.int64) * N + cols
    tl.store(dw_part_ptr + part, tl.sum(dw_acc, axis=0), mask=col_ok)
    if not RMS:
        tl.store(db_part_ptr + part, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _norm_bwd_stats_kernel(
    dy_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr,
    N, stride_dym, stride_hm,
    RMS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Long rows, stage 1: per row c1 = mean(xhat * w * dy), c2 = mean(w * dy)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    rstd = tl.load(rstd_ptr + row)
    mean = 0.0
    if not RMS:
        mean = tl.load(mean_ptr + row)
    acc1 = tl.zeros((BLOCK_N,), tl.float32)
    acc2 = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = c < N
        dy = tl.load(dy_ptr + row * stride_dym + c, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row * stride_hm + c, mask=ok, other=0.0).to(tl.float32)
        wdy = dy * tl.load(w_ptr + c, mask=ok, other=0.0)
        acc1 += tl.where(ok, (h - mean) * rstd, 0.0) * wdy
        acc2 += wdy
    tl.store(c1_ptr + row, tl.sum(acc1, axis=0) / N)
    if not RMS:
        tl.store(c2_ptr + row, tl.sum(acc2, axis=0) / N)


@triton.jit
def _norm_bwd_dx_kernel(
    dy_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr, dh_ptr, dx_ptr,
    dw_part_ptr, db_part_ptr,
    M, N, rows_per_prog,
    stride_dym, stride_hm, stride_dhm, stride_dxm,
    RMS: tl.constexpr, HAS_DH: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Long rows, stage 2: program (group, chunk) writes dX of its rows' chunk and the chunk's
    partial dW/dB."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)             # (BLOCK_N,)
    ok = cols < N
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr + row * stride_dym + cols, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row * stride_hm + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        c1 = tl.load(c1_ptr + row)
        if RMS:
            xhat = h * rstd
            dx = (dy * w - xhat * c1) * rstd
        else:
            xhat = tl.where(ok, (h - tl.load(mean_ptr + row)) * rstd, 0.0)
            dx = (dy * w - (xhat * c1 + tl.load(c2_ptr + row))) * rstd
        if HAS_DH:
            dx += tl.load(dh_ptr + row * stride_dhm + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dxm + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw_acc += dy * xhat
        db_acc += dy
    part = pid.to(tl.int64) * N + cols
    tl.store(dw_part_ptr + part, dw_acc, mask=ok)
    if not RMS:
        tl.store(db_part_ptr + part, db_acc, mask=ok)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _tile(n, tiles):
    """(BLOCK_N, BLOCK_M, num_warps, loop) for rows of length n."""
    for block_n, block_m, warps in tiles:
        if n <= block_n:
            return block_n, block_m, warps, False
    return LOOP_BLOCK, 1, LOOP_WARPS, True


# Arguments are validated by fastattn.layer_norm / rms_norm (and the modules); the launchers
# only assert what the kernels rely on.

def _assert_rows(x):
    assert x.dtype in _DTYPES and x.dim() == 2, "x must be (M, N) fp16/bf16/fp32"
    assert_runnable(x)


def _rows(t, n):
    """t as (M, N) with unit column stride (a copy only if the columns are strided)."""
    assert t.shape[-1] == n
    return t if t.stride(-1) == 1 else t.contiguous()


def _param(p, n, device, fill):
    """The parameter as an fp32 (N,) vector (ones / zeros when absent)."""
    if p is None:
        return torch.full((n,), fill, dtype=torch.float32, device=device)
    assert p.shape == (n,)
    return p.to(torch.float32).contiguous()


def _forward(x, weight, bias, eps, residual, rms):
    _assert_rows(x)
    m, n = x.shape
    x = _rows(x, n)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    w = _param(weight, n, x.device, 1.0)
    b = w if rms else _param(bias, n, x.device, 0.0)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mean = torch.empty(m if not rms else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    h = None
    if residual is not None:
        assert residual.shape == x.shape
        residual = _rows(residual.to(x.dtype), n)
        h = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y, mean, rstd, h
    block_n, block_m, warps, loop = _tile(n, FWD_TILES)
    r, hh = (residual, h) if residual is not None else (x, y)
    # placeholders for unused pointers follow the argument they repeat (kernels/_compat.launch)
    launch(_norm_fwd_kernel)[(triton.cdiv(m, block_m),)](
        x, r, w, b, y, hh, mean if not rms else w, rstd, m, n, float(eps),
        x.stride(0), r.stride(0), y.stride(0), hh.stride(0),
        RMS=rms, HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, LOOP=loop,
        num_warps=warps)
    return y, mean, rstd, h


_SM_COUNT = {}


def _num_groups(device, row_tiles):
    """Programs of the backward: a few per SM on a GPU (each owns a group of rows)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        target = 4 * _SM_COUNT[idx]
    else:
        target = 5       # the interpreter: a few uneven groups
    return max(1, min(row_tiles, target))


def _backward(dy, h, weight, bias, mean, rstd, dh_extra, rms):
    _assert_rows(h)
    m, n = h.shape
    assert dy.shape == h.shape and (dh_extra is None or dh_extra.shape == h.shape)
    dy, h = _rows(dy, n), _rows(h, n)
    w = _param(weight, n, h.device, 1.0)
    if dh_extra is not None:
        dh_extra = _rows(dh_extra, n)
    dx = torch.empty((m, n), dtype=h.dtype, device=h.device)
    if mean is None or rms:
        mean = rstd
    block_n, block_m, warps, loop = _tile(n, BWD_TILES)
    rows_per_prog = 0
    groups = 0
    if m > 0 and n > 0:
        groups = _num_groups(h.device, triton.cdiv(m, block_m))
        # whole tiles per group so groups never overlap
        rows_per_prog = triton.cdiv(triton.cdiv(m, groups), block_m) * block_m
        groups = triton.cdiv(m, rows_per_prog)
    dw_part = torch.empty((groups, n), dtype=torch.float32, device=h.device)
    db_part = torch.empty((groups if not rms else 0, n), dtype=torch.float32, device=h.device)
    dh = dh_extra if dh_extra is not None else dy
    if groups and not loop:
        launch(_norm_bwd_kernel)[(groups,)](
            dy, h, w, mean, rstd, dh, dx, dw_part, db_part if not rms else dw_part,
            m, n, rows_per_prog, dy.stride(0), h.stride(0), dh.stride(0), dx.stride(0),
            RMS=rms, HAS_DH=dh_extra is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps)
    elif groups:
        c1 = torch.empty(m, dtype=torch.float32, device=h.device)
        c2 = torch.empty(m, dtype=torch.float32, device=h.device) if not rms else c1
        launch(_norm_bwd_stats_kernel)[(m,)](
            dy, h, w, mean, rstd, c1, c2, n, dy.stride(0), h.stride(0),
            RMS=rms, BLOCK_N=LOOP_BLOCK, num_warps=LOOP_WARPS)
        launch(_norm_bwd_dx_kernel)[(groups, triton.cdiv(n, DX_BLOCK))](
            dy, h, w, mean, rstd, c1, c2, dh, dx, dw_part, db_part if not rms else dw_part,
            m, n, rows_per_prog, dy.stride(0), h.stride(0), dh.stride(0), dx.stride(0),
            RMS=rms, HAS_DH=dh_extra is not None, BLOCK_N=DX_BLOCK, num_warps=DX_WARPS)
    dweight = dbias = None
    if weight is not None:
        dweight = dw_part.sum(0).to(weight.dtype)
    if not rms and bias is not None:
        dbias = db_part.sum(0).to(bias.dtype)
    return dx, dweight, dbias


def layer_norm_forward(x, weight, bias, eps, residual):
    """-> (y, mean, rstd, h | None); x (M, N), statistics fp32 (M,)."""
    return _forward(x, weight, bias, eps, residual, rms=False)


def layer_norm_backward(dy, h, weight, bias, mean, rstd, dh_extra):
    """-> (dx, dweight | None, dbias | None); dx is the total gradient of h."""
    return _backward(dy, h, weight, bias, mean, rstd, dh_extra, rms=False)


def rms_norm_forward(x, weight, eps, residual):
    """-> (y, rstd, h | None)."""
    y, _, rstd, h = _forward(x, weight, None, eps, residual, rms=True)
    return y, rstd, h


def rms_norm_backward(dy, h, weight, rstd, dh_extra):
    """-> (dx, dweight | None)."""
    dx, dweight, _ = _backward(dy, h, weight, None, None, rstd, dh_extra, rms=True)
    return dx, dweight


_OPS = ("layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward",
        "layer_norm", "rms_norm")


def unsupported(op, **case):
    """Reason this backend cannot run the case, or None. Keys looked at: dtype, device and any
    tensor argument (x, h, dy)."""
    if op not in _OPS:
        return f"unknown op {op!r}"
    return dtype_device_reason(case, ("x", "h", "dy"), _DTYPES)


def static_variants(arch):
    """Every configuration the launchers can pick: dtype x norm x residual/dh x tile."""
    del arch  # the same configurations on sm_80 and sm_90
    out = []
    fwd_tiles = [(bn, bm, w, False) for bn, bm, w in FWD_TILES] + [(LOOP_BLOCK, 1, LOOP_WARPS,
                                                                     True)]
    for dtype in _DTYPES:
        t = _TL_NAME[dtype]
        for rms in (False, True):
            norm = "rms" if rms else "ln"
            for extra in (False, True):     # HAS_RES in the forward, HAS_DH in the backward
                for bn, bm, warps, loop in fwd_tiles:
                    sig = {"x_ptr": f"*{t}", "r_ptr": f"*{t}", "w_ptr": "*fp32",
                           "b_ptr": "*fp32", "y_ptr": f"*{t}", "h_ptr": f"*{t}",
                           "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "M": "i32", "N": "i32",
                           "eps": "fp32", "stride_xm": "i32", "stride_rm": "i32",
                           "stride_ym": "i32", "stride_hm": "i32"}
                    consts = {"RMS": rms, "HAS_RES": extra, "BLOCK_M": bm, "BLOCK_N": bn,
                              "LOOP": loop}
                    sig.update({k: "constexpr" for k in consts})
                    out.append(StaticVariant(
                        _norm_fwd_kernel, f"{norm}_fwd", f"{t} res={int(extra)} "
                        f"{'loop' if loop else 'tile'} BM={bm} BN={bn} w={warps}", sig, consts,
                        num_warps=warps))
                for bn, bm, warps in BWD_TILES:
                    sig = _bwd_signature(t, ("dw_part_ptr", "db_part_ptr"))
                    consts = {"RMS": rms, "HAS_DH": extra, "BLOCK_M": bm, "BLOCK_N": bn}
                    sig.update({k: "constexpr" for k in consts})
                    out.append(StaticVariant(
                        _norm_bwd_kernel, f"{norm}_bwd",
                        f"{t} dh={int(extra)} tile BM={bm} BN={bn} w={warps}", sig, consts,
                        num_warps=warps))
                sig = _bwd_signature(t, ("c1_ptr", "c2_ptr", "dw_part_ptr", "db_part_ptr"))
                consts = {"RMS": rms, "HAS_DH": extra, "BLOCK_N": DX_BLOCK}
                sig.update({k: "constexpr" for k in consts})
                out.append(StaticVariant(_norm_bwd_dx_kernel, f"{norm}_bwd_dx",
                                         f"{t} dh={int(extra)} loop BN={DX_BLOCK} w={DX_WARPS}",
                                         sig, consts, num_warps=DX_WARPS))
            sig = {"dy_ptr": f"*{t}", "h_ptr": f"*{t}", "w_ptr": "*fp32", "mean_ptr": "*fp32",
                   "rstd_ptr": "*fp32", "c1_ptr": "*fp32", "c2_ptr": "*fp32", "N": "i32",
                   "stride_dym": "i32", "stride_hm": "i32"}
            consts = {"RMS": rms, "BLOCK_N": LOOP_BLOCK}
            sig.update({k: "constexpr" for k in consts})
            out.append(StaticVariant(_norm_bwd_stats_kernel, f"{norm}_bwd_stats",
                                     f"{t} loop BN={LOOP_BLOCK} w={LOOP_WARPS}", sig, consts,
                                     num_warps=LOOP_WARPS))
    return out


def _bwd_signature(t, fp32_ptrs):
    sig = {"dy_ptr": f"*{t}", "h_ptr": f"*{t}", "w_ptr": "*fp32", "mean_ptr": "*fp32",
           "rstd_ptr": "*fp32"}
    sig.update({k: "*fp32" for k in fp32_ptrs if k.startswith("c")})
    sig.update({"dh_ptr": f"*{t}", "dx_ptr": f"*{t}"})
    sig.update({k: "*fp32" for k in fp32_ptrs if not k.startswith("c")})
    sig.update({"M": "i32", "N": "i32", "rows_per_prog": "i32", "stride_dym": "i32",
                "stride_hm": "i32", "stride_dhm": "i32", "stride_dxm": "i32"})
    return sig
