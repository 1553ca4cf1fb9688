"""FlashAttention-2 backward: preprocess (delta), dK/dV (loops over query blocks), dQ (over keys).

P is recomputed from the saved lse (probs_from_lse: exactly the forward's P, at any logit
size); nothing of size Sq x Sk is allocated except dmask_full.
No atomics: dK/dV of a kv head sum over the group's query heads inside one program, so the
backward is bitwise deterministic.
"""

import triton
import triton.language as tl

from ._attention_common import (alibi_slope, dropout_keep, dropout_rng, head_mask, kv_len_of,
                                kv_range, probs_from_lse, q_range, scores, sequence_bounds, tile)


@triton.jit
def attn_bwd_preprocess_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, Sq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O (fp32), as the diagonal of dO O^T.

    The dot sums each dO_i . O_i as the dq and dK/dV kernels' dots sum dP_ij = dO_i . V_j, so
    where attention is one-hot (O_i = V_j exactly) dP_ij - delta_i is exactly 0 and so is
    dS = P (dP - delta), as in the exact gradient. A row-sum of dO * O rounds differently, and
    at huge logits dq = scale * dS K turned that last-bit difference into ~1e4 (inf in fp16)."""
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    bh = pid // num_m
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Sq) & (offs_d[None, :] < D)               # (BLOCK_M, BLOCK_D)
    o_rows = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om)                  # (BLOCK_M, 1)
    do_rows = (DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
               + offs_m[:, None].to(tl.int64) * stride_dom)
    o = tl.load(tile(o_rows, offs_d, ALIGNED), mask=ok, other=0.0)      # (BLOCK_M, BLOCK_D)
    do = tl.load(tile(do_rows, offs_d, ALIGNED), mask=ok, other=0.0)
    dod = tl.dot(do, tl.trans(o), input_precision=DOT_PREC)          # (BLOCK_M, BLOCK_M)
    diag = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
    delta = tl.sum(tl.where(diag, dod, 0.0), 1)                       # (BLOCK_M,) exact pick
    tl.store(Delta + bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def load_row_stats(Lse, Delta, row0, Sq, offs_m):
    """lse as stored (natural log; probs_from_lse takes it so) with +inf for empty/out-of-range
    rows (so P = exp(s - lse) = 0), delta.
    row0: offset of the first row of this (batch, head) in Lse and Delta (same layout)."""
    row = row0 + offs_m
    lse = tl.load(Lse + row, mask=offs_m < Sq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + row, mask=offs_m < Sq, other=0.0)
    return lse, delta


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Mask, KeyLens, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    H, Hkv, Sq, Sk, D, group, shift, window_left, window_right,
    sm_scale, softcap, dropout_p, Rng, Alibi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, ALIGNED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    D_SPLIT: tl.constexpr = 1, VARLEN: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
):
    """dK, dV of one key block; with D_SPLIT > 1, D_SPLIT adjacent programs share the block and
    each writes BLOCK_D // D_SPLIT head-dim columns (S and dP need every column, so each
    recomputes them: 1.5x the FLOPs at D_SPLIT=2, for accumulators that fit the registers).
    VARLEN, Lse/Delta addressing: as attn_fwd_kernel."""
    BLOCK_DO: tl.constexpr = BLOCK_D // D_SPLIT
    num_n = tl.cdiv(Sk, BLOCK_N)
    pid = tl.program_id(0)
    pid_s = pid % D_SPLIT
    pid_n = (pid // D_SPLIT) % num_n
    bhk = pid // (D_SPLIT * num_n)
    b = bhk // Hkv
    hk = bhk % Hkv
    q_start, k_start, seq_q, seq_k, shift = sequence_bounds(CuQ, CuK, b, Sq, Sk, shift, VARLEN)
    if pid_n * BLOCK_N >= seq_k:                                      # past a short sequence
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                  # (BLOCK_N,)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = head_mask(offs_d, D, BLOCK_D, EVEN_D, ALIGNED,
                     Q.dtype.element_ty.primitive_bitwidth)          # (1, BLOCK_D)
    kv_len = kv_len_of(KeyLens, b, seq_k, HAS_KL)
    n_ok = (offs_n[:, None] < kv_len) & d_ok                          # (BLOCK_N, BLOCK_D)
    offs_do = pid_s * BLOCK_DO + tl.arange(0, BLOCK_DO)               # columns written here
    do_ok = head_mask(offs_do, D, BLOCK_D, EVEN_D, ALIGNED,
                      Q.dtype.element_ty.primitive_bitwidth)         # (1, BLOCK_DO)
    k_rows = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
              + (k_start + offs_n[:, None]).to(tl.int64) * stride_kn)      # (BLOCK_N, 1)
    v_rows = (V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
              + (k_start + offs_n[:, None]).to(tl.int64) * stride_vn)
    k = tl.load(tile(k_rows, offs_d, ALIGNED), mask=n_ok, other=0.0)    # (BLOCK_N, BLOCK_D)
    v = tl.load(tile(v_rows, offs_d, ALIGNED), mask=n_ok, other=0.0)    # (BLOCK_N, BLOCK_D)

    col_lo = pid_n * BLOCK_N
    col_hi = tl.minimum(col_lo + BLOCK_N, kv_len)
    lo, hi = q_range(col_lo, col_hi, seq_q, shift, window_left, window_right,
                     BLOCK_M, IS_CAUSAL, HAS_WL, HAS_WR)
    hi = tl.where(col_lo < kv_len, hi, 0)                             # block past key_lengths

    seed, rng_offset = dropout_rng(Rng, HAS_DROPOUT)
    dk = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    offs_m0 = tl.arange(0, BLOCK_M)
    # GQA: this kv head's gradient is the sum over its query heads, in a fixed order.
    for g in range(0, group):
        h = hk * group + g
        bh = b * H + h
        q_base = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                  + q_start.to(tl.int64) * stride_qm)
        do_base = (DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                   + q_start.to(tl.int64) * stride_dom)
        row0 = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
        mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        slope = alibi_slope(Alibi, b, H, h, HAS_ALIBI)
        # Transposed tiles (keys x queries): every MMA has M = BLOCK_N, so Hopper can use
        # wgmma whenever BLOCK_N >= 64 even with a small BLOCK_M.
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0                                # (BLOCK_M,)
            m_ok = (offs_m[:, None] < seq_q) & d_ok
            q = tl.load(tile(q_base + offs_m[:, None].to(tl.int64) * stride_qm, offs_d, ALIGNED),
                        mask=m_ok, other=0.0)                         # (BLOCK_M, BLOCK_D)
            do = tl.load(tile(do_base + offs_m[:, None].to(tl.int64) * stride_dom, offs_d, ALIGNED),
                         mask=m_ok, other=0.0)                        # (BLOCK_M, BLOCK_D)
            if D_SPLIT == 1:
                q_o = q
                do_o = do
            else:                                                     # this program's columns
                mo_ok = (offs_m[:, None] < seq_q) & do_ok
                q_o = tl.load(tile(q_base + offs_m[:, None].to(tl.int64) * stride_qm, offs_do,
                                   ALIGNED), mask=mo_ok, other=0.0)   # (BLOCK_M, BLOCK_DO)
                do_o = tl.load(tile(do_base + offs_m[:, None].to(tl.int64) * stride_dom, offs_do,
                                    ALIGNED), mask=mo_ok, other=0.0)  # (BLOCK_M, BLOCK_DO)
            lse, delta = load_row_stats(Lse, Delta, row0, seq_q, offs_m)
            # k q^T sums each element's products in the forward's q k^T order (bit for bit
            # under the interpreter; one MMA k-order on a GPU), so at huge logits P is the
            # forward's; the clamp in probs_from_lse bounds it should the two ever differ
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)   # (BLOCK_N, BLOCK_M)
            s_t, t_t = scores(qk_t, offs_m[None, :], offs_n[:, None], mask_base, stride_mm,
                              stride_mn, seq_q, kv_len, shift, window_left, window_right,
                              sm_scale, softcap, IS_CAUSAL, HAS_WL, HAS_WR, MASK_KIND,
                              HAS_SOFTCAP, NATURAL=True, slope=slope,
                              HAS_ALIBI=HAS_ALIBI)                    # natural log
            p_t = probs_from_lse(s_t, lse[None, :])                   # (BLOCK_N, BLOCK_M) <= 1
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, rng_offset, bh, Sq, Sk, offs_m[None, :],
                                    offs_n[:, None], dropout_p)       # (BLOCK_N, BLOCK_M)
                inv_keep = 1.0 / (1.0 - dropout_p)
                pd_t = tl.where(keep, p_t * inv_keep, 0.0)
                dp_t = tl.where(keep, dp_t * inv_keep, 0.0)
            else:
                pd_t = p_t
            dv = tl.dot(pd_t.to(do.dtype), do_o, dv, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_DO)
            ds_t = p_t * (dp_t - delta[None, :])                      # d(score after softcap)
            if HAS_SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk = tl.dot(ds_t.to(q.dtype), q_o, dk, input_precision=DOT_PREC)   # (BLOCK_N, BLOCK_DO)

    dk = dk * sm_scale
    st_ok = (offs_n[:, None] < seq_k) & do_ok
    tl.store(tile(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
                         + (k_start + offs_n[:, None]).to(tl.int64) * stride_dkn, offs_do,
                  ALIGNED),
             dk.to(DK.dtype.element_ty), mask=st_ok)
    tl.store(tile(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
                         + (k_start + offs_n[:, None]).to(tl.int64) * stride_dvn, offs_do,
                  ALIGNED),
             dv.to(DV.dtype.element_ty), mask=st_ok)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, DMask, Mask, KeyLens, CuQ, CuK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh,
    H, Sq, Sk, D, group, shift, window_left, window_right,
    sm_scale, softcap, dropout_p, Rng, Alibi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, ALIGNED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
    DOT_PREC: tl.constexpr, VARLEN: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
):
    """dQ of one block of query rows. VARLEN, Lse/Delta addressing, Alibi: as attn_fwd_kernel."""
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    bh = pid // num_m
    b = bh // H
    h = bh % H
    hk = h // group
    q_start, k_start, seq_q, seq_k, shift = sequence_bounds(CuQ, CuK, b, Sq, Sk, shift, VARLEN)
    if pid_m * BLOCK_M >= seq_q:                                      # past a short sequence
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = head_mask(offs_d, D, BLOCK_D, EVEN_D, ALIGNED,
                     Q.dtype.element_ty.primitive_bitwidth)          # (1, BLOCK_D)
    m_ok = (offs_m[:, None] < seq_q) & d_ok                           # (BLOCK_M, BLOCK_D)
    q_rows = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + (q_start + offs_m[:, None]).to(tl.int64) * stride_qm)      # (BLOCK_M, 1)
    do_rows = (DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
               + (q_start + offs_m[:, None]).to(tl.int64) * stride_dom)
    q = tl.load(tile(q_rows, offs_d, ALIGNED), mask=m_ok, other=0.0)    # (BLOCK_M, BLOCK_D)
    do = tl.load(tile(do_rows, offs_d, ALIGNED), mask=m_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    row0 = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
    lse, delta = load_row_stats(Lse, Delta, row0, seq_q, offs_m)

    kv_len = kv_len_of(KeyLens, b, seq_k, HAS_KL)
    lo, hi = kv_range(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, seq_q), kv_len, shift,
                      window_left, window_right, BLOCK_N, IS_CAUSAL, HAS_WL, HAS_WR)
    k_base = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
              + k_start.to(tl.int64) * stride_kn)
    v_base = (V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
              + k_start.to(tl.int64) * stride_vn)
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    dmask_base = DMask + bh.to(tl.int64) * Sq * Sk                   # contiguous (B, H, Sq, Sk)
    slope = alibi_slope(Alibi, b, H, h, HAS_ALIBI)
    seed, rng_offset = dropout_rng(Rng, HAS_DROPOUT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = (offs_n[:, None] < kv_len) & d_ok
        k = tl.load(tile(k_base + offs_n[:, None].to(tl.int64) * stride_kn, offs_d, ALIGNED),
                    mask=n_ok, other=0.0)                             # (BLOCK_N, BLOCK_D)
        v = tl.load(tile(v_base + offs_n[:, None].to(tl.int64) * stride_vn, offs_d, ALIGNED),
                    mask=n_ok, other=0.0)                             # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)         # (BLOCK_M, BLOCK_N)
        s, t = scores(qk, offs_m[:, None], offs_n[None, :], mask_base, stride_mm, stride_mn,
                      seq_q, kv_len, shift, window_left, window_right, sm_scale, softcap,
                      IS_CAUSAL, HAS_WL, HAS_WR, MASK_KIND, HAS_SOFTCAP, NATURAL=True,
                      slope=slope, HAS_ALIBI=HAS_ALIBI)
        p = probs_from_lse(s, lse[:, None])                           # (BLOCK_M, BLOCK_N) <= 1
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)        # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, Sq, Sk, offs_m[:, None], offs_n[None, :],
                                dropout_p)                            # (BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])                                # (BLOCK_M, BLOCK_N)
        if MASK_GRAD:
            # gradient of the added float mask = dS (skipped blocks stay at their zero init)
            dm_ptrs = (dmask_base + offs_m[:, None].to(tl.int64) * Sk + offs_n[None, :])
            tl.store(dm_ptrs, ds, mask=(offs_m[:, None] < Sq) & (offs_n[None, :] < Sk))
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    dq = dq * sm_scale
    tl.store(tile(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
                         + (q_start + offs_m[:, None]).to(tl.int64) * stride_dqm, offs_d,
                  ALIGNED),
             dq.to(DQ.dtype.element_ty), mask=m_ok)
