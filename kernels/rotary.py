"""Rotary position embedding (RoPE) as a Triton kernel: NeoX (rotate halves) and GPT-J
(adjacent pairs) styles, partial rotary dim, per-batch position offsets or per-token positions
(B, S), conjugate rotation
(= the backward), in place or out of place, any strides.

One program owns one token (b, s) and a block of BLOCK_H heads; q and k share one launch (the
head blocks of k follow those of q on grid axis 1).
"""

import torch
import triton
import triton.language as tl

from .static_variant import StaticVariant
from ._compat import launch, tracing_triton_op
from ._support import assert_runnable, dtype_device_reason

# (max R/2, BLOCK_K): the chunk of pair indices per step; longer halves loop.
K_BLOCKS = ((16, 16), (32, 32), (None, 64))
# (max heads, BLOCK_H)
H_BLOCKS = ((4, 4), (None, 16))


def _num_warps(block_h, block_k):
    """8 warps for the big tile keeps it at 8 pairs per thread (~64 registers)."""
    return 8 if block_h * block_k >= 1024 else 4

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def _rotate_heads(x_ptr, o_ptr, cos_row, sin_row, pos_ok, b, s, h0, H, R2, D,
                  stride_xb, stride_xs, stride_xh, stride_xd,
                  stride_ob, stride_os, stride_oh, stride_od,
                  stride_ck, sign, copy_rest,
                  INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rotate heads h0 .. h0 + BLOCK_H of token (b, s); copy features >= R unless in place."""
    heads = h0 + tl.arange(0, BLOCK_H).to(tl.int64)    # head strides may be huge  # (BLOCK_H,)
    h_ok = heads < H
    x_tok = x_ptr + b * stride_xb + s * stride_xs + heads[:, None] * stride_xh   # (BLOCK_H, 1)
    o_tok = o_ptr + b * stride_ob + s * stride_os + heads[:, None] * stride_oh
    for k0 in range(0, R2, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                                    # (BLOCK_K,)
        k_ok = (k < R2) & pos_ok
        c = tl.load(cos_row + k * stride_ck, mask=k_ok, other=0.0).to(tl.float32)
        sn = tl.load(sin_row + k * stride_ck, mask=k_ok, other=0.0).to(tl.float32) * sign
        ok = h_ok[:, None] & (k < R2)[None, :]                            # (BLOCK_H, BLOCK_K)
        if INTERLEAVED:
            # pairs (2k, 2k + 1): one (BLOCK_H, BLOCK_K, 2) tile, split into a and b
            d = 2 * k[:, None] + tl.arange(0, 2)[None, :]                 # (BLOCK_K, 2)
            ok3 = ok[:, :, None] & (d < 2 * R2)[None, :, :]               # (BLOCK_H, BLOCK_K, 2)
            xab = tl.load(x_tok[:, :, None] + d[None, :, :] * stride_xd, mask=ok3, other=0.0)
            a, bb = tl.split(xab.to(tl.float32))                          # (BLOCK_H, BLOCK_K)
            ra = a * c[None, :] - bb * sn[None, :]
            rb = a * sn[None, :] + bb * c[None, :]
            out = tl.join(ra, rb).to(o_ptr.dtype.element_ty)              # (BLOCK_H, BLOCK_K, 2)
            tl.store(o_tok[:, :, None] + d[None, :, :] * stride_od, out, mask=ok3)
        else:
            # pairs (k, k + R/2)
            a = tl.load(x_tok + k[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
            bb = tl.load(x_tok + (k + R2)[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
            tl.store(o_tok + k[None, :] * stride_od,
                     (a * c[None, :] - bb * sn[None, :]).to(o_ptr.dtype.element_ty), mask=ok)
            tl.store(o_tok + (k + R2)[None, :] * stride_od,
                     (a * sn[None, :] + bb * c[None, :]).to(o_ptr.dtype.element_ty), mask=ok)
    # features R .. D pass through (nothing to do in place: copy_rest == 0)
    rest_end = tl.where(copy_rest != 0, D, 2 * R2)
    for d0 in range(2 * R2, rest_end, 2 * BLOCK_K):
        d = d0 + tl.arange(0, 2 * BLOCK_K)                                # (2 * BLOCK_K,)
        ok = h_ok[:, None] & (d < D)[None, :]
        v = tl.load(x_tok + d[None, :] * stride_xd, mask=ok, other=0.0)
        tl.store(o_tok + d[None, :] * stride_od, v, mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, off_ptr, pos_ptr,
    S, HQ, HK, R2, D, S_CACHE, q_head_blocks,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_qob, stride_qos, stride_qoh, stride_qod,
    stride_kob, stride_kos, stride_koh, stride_kod,
    stride_cs, stride_ck,
    sign, has_offsets, has_positions, copy_rest_q, copy_rest_k,
    INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = tok // S
    s = tok % S
    pos = s
    if has_offsets != 0:
        pos = s + tl.load(off_ptr + b).to(tl.int64)
    if has_positions != 0:               # (B, S) contiguous: the cache row of this token
        pos = tl.load(pos_ptr + tok).to(tl.int64)
    pos_ok = (pos >= 0) & (pos < S_CACHE)  # the ops layer checks; never read outside the cache
    cos_row = cos_ptr + pos * stride_cs
    sin_row = sin_ptr + pos * stride_cs
    if hb < q_head_blocks:
        _rotate_heads(q_ptr, qo_ptr, cos_row, sin_row, pos_ok, b, s, hb * BLOCK_H, HQ, R2, D,
                      stride_qb, stride_qs, stride_qh, stride_qd,
                      stride_qob, stride_qos, stride_qoh, stride_qod,
                      stride_ck, sign, copy_rest_q, INTERLEAVED, BLOCK_H, BLOCK_K)
    else:
        _rotate_heads(k_ptr, ko_ptr, cos_row, sin_row, pos_ok, b, s,
                      (hb - q_head_blocks) * BLOCK_H, HK, R2, D,
                      stride_kb, stride_ks, stride_kh, stride_kd,
                      stride_kob, stride_kos, stride_koh, stride_kod,
                      stride_ck, sign, copy_rest_k, INTERLEAVED, BLOCK_H, BLOCK_K)


def _pick(table, n):
    for limit, block in table:
        if limit is None or n <= limit:
            return block
    raise AssertionError("unreachable")


# Arguments are validated by fastattn.apply_rotary / apply_rotary_qk / kvcache_attention; the
# launchers only assert what the kernel relies on.

def _assert_x(x):
    assert x.dtype in _DTYPES and x.dim() == 4, "x must be (B, S, H, D) fp16/bf16/fp32"
    assert_runnable(x)


def _out_or_new(out, x):
    if out is None:
        return torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    return out


def _tables(cos, sin, x, d):
    assert cos.dim() == 2 and cos.shape == sin.shape, "cos, sin must both be (S_cache, R/2)"
    r2 = cos.shape[1]
    assert 0 < 2 * r2 <= d, "cos/sin must rotate 0 < R <= head dim features"
    # the kernel reads tables in x's dtype or fp32, cos and sin with one layout
    dtype = cos.dtype if cos.dtype in (x.dtype, torch.float32) else torch.float32
    cos, sin = cos.to(dtype), sin.to(dtype)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, r2


def _same_view(a, b):
    """out is x itself (in place): the pass-through features need no copy."""
    if a is b:
        return True
    if tracing_triton_op():     # traced tensors have no data pointer; traced ops are out of place
        return False
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def _launch(q, k, cos, sin, interleaved, offsets, conjugate, q_out, k_out, positions=None):
    b, s, hq, d = q.shape
    hk = k.shape[2] if k is not None else 0
    cos, sin, r2 = _tables(cos, sin, q, d)
    if offsets is not None:
        assert offsets.shape == (b,), "offsets must be (B,)"
        offs = offsets.to(device=q.device, dtype=torch.int32)
    else:
        offs = torch.zeros(1, dtype=torch.int32, device=q.device)
    if positions is not None:
        assert offsets is None and tuple(positions.shape) == (b, s), "positions must be (B, S)"
        poss = positions.to(device=q.device, dtype=torch.int32).contiguous()
    else:
        poss = offs
    if q.numel() == 0 and hk == 0:
        return
    block_k = _pick(K_BLOCKS, r2)
    block_h = _pick(H_BLOCKS, max(hq, hk))
    q_blocks = triton.cdiv(hq, block_h)
    k_blocks = triton.cdiv(hk, block_h)
    if k is None:                         # q only: the k arguments are never read
        k, k_out = q, q_out
    if b * s == 0 or q_blocks + k_blocks == 0:
        return
    launch(_rotary_kernel)[(b * s, q_blocks + k_blocks)](
        q, k, q_out, k_out, cos, sin, offs, poss,
        s, hq, hk, r2, d, cos.shape[0], q_blocks,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        cos.stride(0), cos.stride(1),
        -1.0 if conjugate else 1.0, int(offsets is not None), int(positions is not None),
        int(not _same_view(q_out, q)), int(not _same_view(k_out, k)),
        INTERLEAVED=bool(interleaved), BLOCK_H=block_h, BLOCK_K=block_k,
        num_warps=_num_warps(block_h, block_k))


def rotary_forward(x, cos, sin, *, interleaved=False, offsets=None, conjugate=False, out=None,
                   positions=None):
    """Rotate the first R = 2 * cos.shape[1] features of x (B, S, H, D); returns out.
    positions (B, S): the cache row of every token (instead of s + offsets[b])."""
    _assert_x(x)
    out = _out_or_new(out, x)
    _launch(x, None, cos, sin, interleaved, offsets, conjugate, out, None, positions)
    return out


def rotary_forward_qk(q, k, cos, sin, *, interleaved=False, offsets=None, conjugate=False,
                      q_out=None, k_out=None, positions=None):
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D) in one launch; returns (q_out, k_out)."""
    _assert_x(q)
    _assert_x(k)
    assert k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[3] and k.dtype == q.dtype \
        and k.device == q.device, "k must match q in batch, sequence, head dim and dtype"
    q_out = _out_or_new(q_out, q)
    k_out = _out_or_new(k_out, k)
    _launch(q, k, cos, sin, interleaved, offsets, conjugate, q_out, k_out, positions)
    return q_out, k_out


def unsupported(op, **case):
    """Reason this backend cannot run the case, or None. Keys looked at: dtype, device and any
    tensor argument (x, q)."""
    if op not in ("rotary", "rotary_qk", "rotary_forward", "rotary_forward_qk"):
        return f"unknown op {op!r}"
    return dtype_device_reason(case, ("x", "q"), _DTYPES)


def static_variants(arch):
    """Every configuration the launchers can pick: x dtype x table dtype x style x blocks."""
    del arch  # the same configurations on sm_80 and sm_90
    out = []
    for dtype in _DTYPES:
        t = _TL_NAME[dtype]
        for ct in sorted({t, "fp32"}):
            for interleaved in (False, True):
                for _, block_k in K_BLOCKS:
                    for _, block_h in H_BLOCKS:
                        sig = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "qo_ptr": f"*{t}",
                               "ko_ptr": f"*{t}", "cos_ptr": f"*{ct}", "sin_ptr": f"*{ct}",
                               "off_ptr": "*i32", "pos_ptr": "*i32"}
                        sig.update({k: "i32" for k in ("S", "HQ", "HK", "R2", "D", "S_CACHE",
                                                       "q_head_blocks")})
                        for p in ("q", "k", "qo", "ko"):
                            sig.update({f"stride_{p}{a}": "i32" for a in "bsh"})
                        sig.update({"stride_cs": "i32", "sign": "fp32", "has_offsets": "i32",
                                    "has_positions": "i32",
                                    "copy_rest_q": "i32", "copy_rest_k": "i32"})
                        # as the JIT specialises them: unit feature / table strides
                        consts = {"stride_qd": 1, "stride_kd": 1, "stride_qod": 1,
                                  "stride_kod": 1, "stride_ck": 1, "INTERLEAVED": interleaved,
                                  "BLOCK_H": block_h, "BLOCK_K": block_k}
                        sig.update({k: "constexpr" for k in consts})
                        sig = {name: sig[name] for name in _ARG_ORDER}
                        style = "gptj" if interleaved else "neox"
                        warps = _num_warps(block_h, block_k)
                        out.append(StaticVariant(
                            _rotary_kernel, "rotary", f"{t} cos={ct} {style} BH={block_h} "
                            f"BK={block_k} w={warps}", sig, consts, num_warps=warps))
    return out


_ARG_ORDER = list(_rotary_kernel.arg_names)
