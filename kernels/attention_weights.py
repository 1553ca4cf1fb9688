"""Triton kernel for the attention probabilities P = exp(s - lse) (need_weights=True).

Given the log-sum-exp saved by the attention forward, each probability is one exp of its
score: no max or sum pass. One program per (b*h, query block) loops over the visible key
blocks; masks, causal/window rules, key_lengths and softcap follow the attention contract
(docs/backend-contract.md): the scores come from the attention kernels' own `scores`, so P
matches the softmax the attention used.
"""

import torch
import triton
import triton.language as tl

from ._attention_common import probs_from_lse, scores
from ._compat import interpreting, launch


@triton.jit
def attn_weights_kernel(
    Q, K, Lse, P, Mask, KeyLens,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_pb, stride_ph, stride_pm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, Sq, Sk, D, group, shift, window_left, window_right, sm_scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_KL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    bh = pid // num_m
    b = bh // H
    h = bh % H
    hk = h // group                                                   # GQA kv head

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)                                    # (BLOCK_D,)
    m_ok = offs_m < Sq
    d_ok = offs_d[None, :] < D                                        # (1, BLOCK_D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok, other=0.0)                 # (BLOCK_M, BLOCK_D)
    lse = tl.load(Lse + bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=float("-inf"))
    empty = lse == float("-inf")                                      # rows with no visible key
    lse = tl.where(empty, float("inf"), lse)                          # P = 0 in empty rows

    kv_len = Sk
    if HAS_KL:
        kv_len = tl.maximum(tl.minimum(tl.load(KeyLens + b).to(tl.int32), Sk), 0)
    # [lo, hi): the key range any row of this block can see
    row_lo = pid_m * BLOCK_M
    row_hi = tl.minimum(row_lo + BLOCK_M, Sq)
    lo = 0
    hi = kv_len
    if IS_CAUSAL:
        hi = tl.minimum(hi, row_hi + shift)
    if HAS_WR:
        hi = tl.minimum(hi, row_hi + shift + window_right)
    if HAS_WL:
        lo = (tl.maximum(row_lo + shift - window_left, 0) // BLOCK_N) * BLOCK_N
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    p_base = P + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    offs_n0 = tl.arange(0, BLOCK_N)
    # key blocks outside [lo, hi) are invisible: P was zero-filled by the launcher
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0                                    # (BLOCK_N,)
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                    mask=(offs_n[:, None] < kv_len) & d_ok, other=0.0)   # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)         # (BLOCK_M, BLOCK_N)
        s, _ = scores(qk, offs_m[:, None], offs_n[None, :], mask_base, stride_mm, stride_mn,
                      Sq, kv_len, shift, window_left, window_right, sm_scale, softcap,
                      IS_CAUSAL, HAS_WL, HAS_WR, MASK_KIND, HAS_SOFTCAP, NATURAL=True)
        p = probs_from_lse(s, lse[:, None])                           # (BLOCK_M, BLOCK_N) <= 1
        tl.store(p_base + offs_m[:, None].to(tl.int64) * stride_pm + offs_n[None, :],
                 p.to(P.dtype.element_ty), mask=m_ok[:, None] & (offs_n[None, :] < Sk))


def gpu_tiles(fp32, head_dim, has_mask):
    """(BLOCK_M, BLOCK_N) without spills on sm_80/90 (from the GPU static report): fp32
    (ieee, no tensor cores) and mask loads need smaller tiles."""
    if fp32:
        return (32, 32) if head_dim <= 64 else (16, 32)
    return (64, 32) if has_mask else (64, 64)


def unsupported(op, **case):
    """Why this launcher cannot run the case, or None (fastattn._backend.select)."""
    from ._support import dtype_device_reason
    return dtype_device_reason(case, (), (torch.float16, torch.bfloat16, torch.float32))


def attention_weights_forward(q, k, lse, *, mask=None, key_lengths=None, scale, causal=False,
                              alignment="top_left", window_left=-1, window_right=-1,
                              softcap=0.0, average=False):
    """P (B, H, Sq, Sk) in q's dtype, or its mean over heads (B, Sq, Sk) with `average`.
    q (B, H, Sq, D), k (B, Hkv, Sk, D) any strides; lse (B, H, Sq) fp32; mask None or expanded to (B, H, Sq, Sk) (bool True = may attend, or
    float added); key_lengths int (B,) or None."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    assert H % Hkv == 0 and k.shape[-1] == D and lse.shape == (B, H, Sq)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    lse = lse.to(torch.float32).contiguous()
    p = torch.zeros((B, H, Sq, Sk), device=q.device, dtype=q.dtype)
    if p.numel() == 0:
        return p.mean(dim=1) if average else p
    mask_kind, mask_arg, mask_strides = 0, q, (0, 0, 0, 0)
    if mask is not None:
        mask = mask.expand(B, H, Sq, Sk)
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask_arg = mask.view(torch.uint8) if mask_kind == 1 else mask
        mask_strides = tuple(mask.stride())
    kl = q if key_lengths is None else key_lengths.to(device=q.device,
                                                     dtype=torch.int32).contiguous()
    bm, bn = (16, 16) if interpreting() else gpu_tiles(q.dtype == torch.float32, D,
                                                      mask is not None)
    block_d = max(16, triton.next_power_of_2(D))
    fp32_prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    shift = Sk - Sq if alignment == "bottom_right" else 0
    grid = (triton.cdiv(Sq, bm) * B * H,)
    launch(attn_weights_kernel)[grid](
        q, k, lse, p, mask_arg, kl,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        p.stride(0), p.stride(1), p.stride(2), *mask_strides,
        H, Sq, Sk, D, H // Hkv, shift, int(window_left), int(window_right), float(scale),
        float(softcap),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, IS_CAUSAL=bool(causal),
        HAS_WL=window_left >= 0, HAS_WR=window_right >= 0, MASK_KIND=mask_kind,
        HAS_KL=key_lengths is not None, HAS_SOFTCAP=softcap > 0,
        DOT_PREC=fp32_prec if q.dtype == torch.float32 else "tf32",
        num_warps=4)
    return p.mean(dim=1) if average else p


def static_variants(arch):
    """The configurations the launcher compiles on a GPU (for the GPU static report)."""
    from .static_variant import StaticVariant
    del arch                                            # one tile for every arch
    out = []
    for dt in ("fp16", "bf16", "fp32"):
        for d in (64, 128):
            for causal, mask_kind in ((True, 0), (False, 1), (False, 2)):
                sig = {"Q": f"*{dt}", "K": f"*{dt}", "Lse": "*fp32", "P": f"*{dt}",
                       "Mask": "*u8" if mask_kind == 1 else f"*{dt}", "KeyLens": "*i32"}
                sig.update({n: "i64" for n in (
                    "stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh",
                    "stride_kn", "stride_pb", "stride_ph", "stride_pm", "stride_mb",
                    "stride_mh", "stride_mm", "stride_mn")})
                sig.update({n: "i32" for n in ("H", "Sq", "Sk", "D", "group", "shift",
                                               "window_left", "window_right")})
                sig.update({"sm_scale": "fp32", "softcap": "fp32"})
                bm, bn = gpu_tiles(dt == "fp32", d, mask_kind != 0)
                consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, IS_CAUSAL=causal,
                              HAS_WL=False, HAS_WR=False, MASK_KIND=mask_kind, HAS_KL=False,
                              HAS_SOFTCAP=False, DOT_PREC="ieee" if dt == "fp32" else "tf32")
                sig.update({n: "constexpr" for n in consts})
                kind = ("causal", "bool mask", "float mask")[mask_kind if not causal else 0]
                out.append(StaticVariant(attn_weights_kernel, "attention_weights",
                                         f"{dt} d={d} {kind} BM={bm} BN={bn} w=4", sig, consts,
                                         num_warps=4, num_stages=1))
    return out
