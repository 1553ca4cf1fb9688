"""Flash-decoding: few queries (Sq <= 16) against a long Sk.

Stage 1 splits Sk across programs; each writes a partial (out, lse) in fp32. The rows of one
program are the (query head of the GQA group, query index) pairs that share a kv head, so the
group's queries fill the MMA tile and K/V are read once per group. Stage 2 merges the splits.
"""

import triton
import triton.language as tl

from ._attention_configs import MERGE_BLOCK_S
from ._compat import launch
from ._attention_common import (alibi_slope, head_mask, kv_len_of, kv_range, natural_lse,
                                online_softmax_step, scores, tile)


@triton.jit
def split_program(group, Sq, Hkv, num_splits, BLOCK_M: tl.constexpr):
    """This program's (b, kv head, split, h, offs_i, r_ok) for a split-K grid of
    (B * Hkv) x num_splits x row blocks. Its BLOCK_M rows are packed (query head of the GQA
    group, query index) pairs g * Sq + i sharing the kv head: h (BLOCK_M,) is the query head,
    offs_i (BLOCK_M,) the query index and r_ok (BLOCK_M,) whether the row exists. Padded rows
    repeat row 0 (in bounds everywhere); their results are never stored."""
    rows = group * Sq
    num_r = tl.cdiv(rows, BLOCK_M)
    pid = tl.program_id(0)
    pid_r = pid % num_r
    split = (pid // num_r) % num_splits
    bhk = pid // (num_r * num_splits)
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)                  # packed row g*Sq + i
    r_ok = offs_r < rows
    offs_rc = tl.where(r_ok, offs_r, 0)
    g = offs_rc // Sq
    offs_i = offs_rc % Sq                                              # (BLOCK_M,) query index
    h = hk * group + g                                                # (BLOCK_M,) query head
    return b, hk, split, h, offs_i, r_ok


@triton.jit
def store_split_partial(OPart, LPart, acc, m_i, l_i, b, H, h, split, num_splits, Sq, offs_i,
                        r_ok, offs_d, d_ok, BLOCK_D: tl.constexpr):
    """Normalise one split's online-softmax state and store it as attn_decode_merge_kernel
    reads it: out (B*H, num_splits, Sq, BLOCK_D) fp32 (rows always 16-byte aligned) and lse
    (B*H, num_splits, Sq) in log2 units, -inf for rows that saw no key."""
    empty = l_i == 0.0
    out = acc * tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    prow = ((b * H + h).to(tl.int64) * num_splits + split) * Sq + offs_i   # (BLOCK_M,)
    tl.store(tile(OPart + prow[:, None] * BLOCK_D, offs_d, True), out, mask=r_ok[:, None] & d_ok)
    tl.store(LPart + prow, lse2, mask=r_ok)


@triton.jit
def attn_decode_split_kernel(
    Q, K, V, OPart, LPart, Mask, KeyLens,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, Hkv, Sq, Sk, D, group, shift, window_left, window_right,
    sm_scale, softcap, chunk, num_splits, Alibi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, ALIGNED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, HAS_ALIBI: tl.constexpr = False,
):
    b, hk, split, h, offs_i, r_ok = split_program(group, Sq, Hkv, num_splits, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = head_mask(offs_d, D, BLOCK_D, EVEN_D, ALIGNED,
                     Q.dtype.element_ty.primitive_bitwidth)          # (1, BLOCK_D)
    q = tl.load(tile(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh
                            + offs_i[:, None].to(tl.int64) * stride_qm, offs_d, ALIGNED),
                mask=r_ok[:, None] & d_ok, other=0.0)                 # (BLOCK_M, BLOCK_D)

    kv_len = kv_len_of(KeyLens, b, Sk, HAS_KL)
    lo, hi = kv_range(0, Sq, kv_len, shift, window_left, window_right,
                      BLOCK_N, IS_CAUSAL, HAS_WL, HAS_WR)
    lo = tl.maximum(lo, split * chunk)                                # chunk is BLOCK_N aligned
    hi = tl.minimum(hi, split * chunk + chunk)

    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    # the mask is per query head: fold the head into the row offset (stride_mm per query row)
    mask_rows = (Mask + b.to(tl.int64) * stride_mb + h[:, None].to(tl.int64) * stride_mh
                 + offs_i[:, None].to(tl.int64) * (stride_mm - 1))     # (BLOCK_M, 1)
    slope = alibi_slope(Alibi, b, H, h, HAS_ALIBI)                     # (BLOCK_M,) per row
    if HAS_ALIBI:
        slope = slope[:, None]                                        # (BLOCK_M, 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                    # (BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = (offs_n[:, None] < kv_len) & d_ok
        k = tl.load(tile(k_base + offs_n[:, None].to(tl.int64) * stride_kn, offs_d, ALIGNED),
                    mask=n_ok, other=0.0)                             # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)         # (BLOCK_M, BLOCK_N)
        # scores() addresses the mask as base + i * stride_mm + j * stride_mn; rows here differ
        # in head too, so hand it per-row bases (BLOCK_M, 1) that cancel i with stride 1
        s2, _t = scores(qk, offs_i[:, None], offs_n[None, :], mask_rows, 1, stride_mn, Sq,
                        kv_len, shift, window_left, window_right, sm_scale, softcap,
                        IS_CAUSAL, HAS_WL, HAS_WR, MASK_KIND, HAS_SOFTCAP, slope=slope,
                        HAS_ALIBI=HAS_ALIBI)
        p, alpha, m_new, l_i = online_softmax_step(s2, m_i, l_i)      # p (BLOCK_M, BLOCK_N)
        v = tl.load(tile(v_base + offs_n[:, None].to(tl.int64) * stride_vn, offs_d, ALIGNED),
                    mask=n_ok, other=0.0)                             # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    store_split_partial(OPart, LPart, acc, m_i, l_i, b, H, h, split, num_splits, Sq, offs_i,
                        r_ok, offs_d, d_ok, BLOCK_D)


@triton.jit
def attn_decode_merge_kernel(
    OPart, LPart, Out, Lse,
    stride_ob, stride_oh, stride_om,
    H, Sq, D, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (b, h, i): out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max).

    Splits are read BLOCK_S at a time (first pass: max, second: weighted sum) so one compiled
    variant serves any number of splits.
    """
    pid = tl.program_id(0)
    i = pid % Sq
    bh = pid // Sq
    b = bh // H
    h = bh % H
    offs_s0 = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = bh.to(tl.int64) * num_splits

    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + offs_s0
        lse2 = tl.load(LPart + (row0 + offs_s) * Sq + i, mask=offs_s < num_splits,
                       other=float("-inf"))                            # (BLOCK_S,) log2 units
        m = tl.maximum(m, lse2)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)

    w_sum = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + offs_s0
        prow = (row0 + offs_s) * Sq + i                                # (BLOCK_S,)
        lse2 = tl.load(LPart + prow, mask=offs_s < num_splits, other=float("-inf"))
        w = tl.exp2(lse2 - m_safe)                                     # 0 for empty splits
        o = tl.load(OPart + prow[:, None] * BLOCK_D + offs_d[None, :],
                    mask=(offs_s[:, None] < num_splits) & (offs_d[None, :] < D),
                    other=0.0)                                         # (BLOCK_S, BLOCK_D)
        w_sum += w
        acc += tl.sum(o * w[:, None], 0)
    total = tl.sum(w_sum, 0)
    empty = total == 0.0
    out = acc * tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    lse = natural_lse(m_safe, total)             # rounded as the dense forward's (backward-exact)
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + i.to(tl.int64) * stride_om + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)
    tl.store(Lse + bh.to(tl.int64) * Sq + i, lse)


# ----------------------------------------------------------------------------- host side

def split_chunks(n_keys, block_n, num_splits):
    """(chunk, num_splits) of a split-K launch over n_keys keys: the requested split count is
    clamped to 1..1024 and to the BLOCK_N blocks there are, each split then gets a BLOCK_N
    aligned chunk of keys and the count is what covers n_keys (at least 1)."""
    n_blocks = max(1, triton.cdiv(n_keys, block_n))
    num_splits = max(1, min(int(num_splits), n_blocks, 1024))
    chunk = triton.cdiv(triton.cdiv(max(n_keys, 1), num_splits), block_n) * block_n
    return chunk, max(1, triton.cdiv(n_keys, chunk))


def merge_split_partials(opart, lpart, out, lse, out_strides, H, Sq, D):
    """Stage 2: out and lse (B, H, Sq) fp32 from the partials opart (B*H, splits, Sq, BLOCK_D)
    and lpart (B*H, splits, Sq) that the split kernels stored. out_strides: (b, h, i) strides
    of out (any layout; written without vector hints)."""
    bh, num_splits, _, block_d = opart.shape
    launch(attn_decode_merge_kernel)[(bh * Sq,)](
        opart, lpart, out, lse, *out_strides, H, Sq, D, num_splits,
        BLOCK_S=MERGE_BLOCK_S, BLOCK_D=block_d, num_warps=4)
