"""FlashAttention-2 forward kernel: online softmax over key blocks, saves lse (natural log)."""

import triton
import triton.language as tl

from ._attention_common import (alibi_slope, dropout_keep, dropout_rng, head_mask, kv_len_of,
                                kv_range, natural_lse, online_softmax_step, scores,
                                sequence_bounds, tile)


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, KeyLens, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    H, Sq, Sk, D, group, shift, window_left, window_right,
    sm_scale, softcap, dropout_p, Rng, Alibi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, ALIGNED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
):
    """One block of query rows of one (batch, head). VARLEN (packed sequences): batch index b
    is sequence b, whose rows start at CuQ[b] / CuK[b] of the token dim (stride_*m / *n; the
    batch strides are 0); Sq / Sk are the max lengths (grid and dropout RNG index), each
    sequence is bottom-right aligned (shift = its length_k - length_q). Lse is addressed as
    b * stride_lb + h * stride_lh + row: (B, H, Sq) dense, (H, total_q) packed.
    HAS_ALIBI: Alibi (B, H) fp32 slopes (b = sequence when VARLEN); a dummy pointer without.
    HAS_DROPOUT: Rng int64 [seed, offset] (dropout_rng); a dummy pointer without."""
    # 1-D grid: query blocks of one head are adjacent (K/V stay in L2); no 65535 grid limit.
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    bh = pid // num_m
    b = bh // H
    h = bh % H
    hk = h // group                                                   # GQA: never repeat K/V
    q_start, k_start, seq_q, seq_k, shift = sequence_bounds(CuQ, CuK, b, Sq, Sk, shift, VARLEN)
    if pid_m * BLOCK_M >= seq_q:                                      # past a short sequence
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)                                    # (BLOCK_D,)
    d_ok = head_mask(offs_d, D, BLOCK_D, EVEN_D, ALIGNED,
                     Q.dtype.element_ty.primitive_bitwidth)          # (1, BLOCK_D)

    q_rows = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + (q_start + offs_m[:, None]).to(tl.int64) * stride_qm)      # (BLOCK_M, 1)
    q = tl.load(tile(q_rows, offs_d, ALIGNED), mask=(offs_m[:, None] < seq_q) & d_ok,
                other=0.0)                                            # (BLOCK_M, BLOCK_D)

    kv_len = kv_len_of(KeyLens, b, seq_k, HAS_KL)
    lo, hi = kv_range(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, seq_q), kv_len, shift,
                      window_left, window_right, BLOCK_N, IS_CAUSAL, HAS_WL, HAS_WR)

    offs_n0 = tl.arange(0, BLOCK_N)                                   # (BLOCK_N,)
    k_base = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
              + k_start.to(tl.int64) * stride_kn)
    v_base = (V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
              + k_start.to(tl.int64) * stride_vn)
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    slope = alibi_slope(Alibi, b, H, h, HAS_ALIBI)
    seed, rng_offset = dropout_rng(Rng, HAS_DROPOUT)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)               # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                             # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                    # (BLOCK_M, BLOCK_D)

    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n[:, None] < kv_len                               # (BLOCK_N, 1)
        k = tl.load(tile(k_base + offs_n[:, None].to(tl.int64) * stride_kn, offs_d, ALIGNED),
                    mask=n_ok & d_ok, other=0.0)                      # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)         # (BLOCK_M, BLOCK_N)
        s2, _t = scores(qk, offs_m[:, None], offs_n[None, :], mask_base, stride_mm, stride_mn,
                        seq_q, kv_len, shift, window_left, window_right, sm_scale, softcap,
                        IS_CAUSAL, HAS_WL, HAS_WR, MASK_KIND, HAS_SOFTCAP, slope=slope,
                        HAS_ALIBI=HAS_ALIBI)
        p, alpha, m_new, l_i = online_softmax_step(s2, m_i, l_i)      # p (BLOCK_M, BLOCK_N)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, Sq, Sk, offs_m[:, None], offs_n[None, :],
                                dropout_p)                            # (BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        # masked V rows are zeroed so garbage past key_lengths cannot give 0 * NaN
        v = tl.load(tile(v_base + offs_n[:, None].to(tl.int64) * stride_vn, offs_d, ALIGNED),
                    mask=n_ok & d_ok, other=0.0)                      # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0                                                # fully masked row
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = natural_lse(m_i, l_i)                                       # natural log, (BLOCK_M,)

    o_rows = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + (q_start + offs_m[:, None]).to(tl.int64) * stride_om)      # (BLOCK_M, 1)
    tl.store(tile(o_rows, offs_d, ALIGNED), out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < seq_q) & d_ok)
    lse_row = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
    tl.store(Lse + lse_row + offs_m, lse, mask=offs_m < seq_q)
