"""Device helpers shared by the attention kernels: scores, visibility, loop bounds, dropout RNG.

Scores are kept in log2 units (s2 = s * log2(e)) so the forward's softmax uses exp2. The lse it
stores is natural log (the contract's), formed by `natural_lse` so that the kernels which
recompute P from it (backward, attention weights) get P exactly as the forward formed it, at any
logit size: they take each score to natural log the same way (`scores(..., NATURAL=True)`) and
subtract lse before leaving natural log (`probs_from_lse`).

ALiBi (HAS_ALIBI) is a term of `scores` too, so forward, backward and decode form the biased
score with the same operations and P = exp(s - lse) stays the forward's. `alibi_slope` reads
the slope of (batch, query head) from the contiguous fp32 (B, H) slopes.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# MASK_KIND values
MASK_NONE = 0
MASK_BOOL = 1
MASK_FLOAT = 2


@triton.jit
def tanh_approx_free(x):
    # tanh via exp2; exact limits: exp2 -> inf gives 1, exp2 -> 0 gives -1 (no NaN).
    e = tl.exp2(x * (2.0 * 1.4426950408889634))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def tile(row_ptrs, offs_d, ALIGNED: tl.constexpr):
    """(rows, 1) row-start pointers + (BLOCK_D,) columns -> (rows, BLOCK_D) pointer tile.

    With ALIGNED (set by the launcher only when base pointers, strides and D make it true) the
    compiler is told every row starts on 16 bytes, so loads vectorise and pipeline as under
    Triton's own argument specialisation, and an offline compile sees the same code. The hint
    must sit on an op created here: a hint on a function argument is silently dropped.
    """
    ptrs = row_ptrs + offs_d[None, :]
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, [16, 16])
    return ptrs


@triton.jit
def head_mask(offs_d, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGNED: tl.constexpr,
              ELEM_BITS: tl.constexpr):
    """(1, BLOCK_D) mask of the head-dim columns to touch (all true when D == BLOCK_D).

    With ALIGNED the launcher guarantees every row holds whole 16-byte vectors up to
    cdiv(D, VEC) * VEC, zero past D, so the mask works in whole vectors: the compiler then
    knows it is constant over each vector and keeps loads vectorised.
    """
    if EVEN_D:
        return offs_d[None, :] < BLOCK_D
    if ALIGNED:
        VEC: tl.constexpr = 128 // ELEM_BITS
        return (offs_d[None, :] // VEC) < tl.cdiv(D, VEC)
    return offs_d[None, :] < D


@triton.jit
def sequence_bounds(CuQ, CuK, b, Sq, Sk, shift, VARLEN: tl.constexpr):
    """(q_start, k_start, seq_q, seq_k, shift) of batch entry b: its first query / key row and
    its lengths. Dense: rows from 0, lengths Sq / Sk, the caller's shift. VARLEN (packed
    sequences): sequence b spans CuQ[b]..CuQ[b+1] / CuK[b]..CuK[b+1] of the token dim and is
    bottom-right aligned (shift = seq_k - seq_q)."""
    q_start = b * 0
    k_start = b * 0
    seq_q = Sq
    seq_k = Sk
    if VARLEN:
        q_start = tl.load(CuQ + b)
        seq_q = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        seq_k = tl.load(CuK + b + 1) - k_start
        shift = seq_k - seq_q
    return q_start, k_start, seq_q, seq_k, shift


@triton.jit
def online_softmax_step(s2, m_i, l_i):
    """One key block of the online softmax, scores s2 (rows, keys) in log2 units:
    (p = exp2(s2 - m_new), alpha = rescale of the old sums, m_new, l_new). A row with nothing
    visible yet keeps m = -inf; 0 is subtracted instead (no inf - inf)."""
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s2 - m_safe[:, None])                                 # (rows, keys)
    alpha = tl.exp2(m_i - m_safe)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def natural_lse(m2, l):
    """Natural-log lse of rows whose online softmax ended at max m2 (log2 units) and sum l (of
    exp2(s2 - m2)); -inf where l == 0 (no visible key).

    lse = fl(m2 * ln2) + ln(l), the product rounded on its own (the select between it and the
    add keeps the compiler from fusing the two into an fma). A kernel recomputing P takes each
    score to natural log as fl(s2 * ln2) (scores(..., NATURAL=True)), so at a row's max key
    s - lse is exactly -ln(l) up to lse's own rounding: -0 for a one-hot row, however large the
    logits. (An lse2 = m2 + log2(l) converted to natural log and back is off by ~2 ulp(lse2):
    more than 1 in the exponent from logits of ~1e6 on, which made P 0 or 1 at random there.)
    """
    empty = l == 0.0
    m = tl.where(empty, float("-inf"), m2 * 0.6931471805599453)      # fl(m2 * ln2), or -inf
    return m + tl.log2(tl.where(empty, 1.0, l)) * 0.6931471805599453


@triton.jit
def probs_from_lse(s, lse):
    """P = exp(s - lse) from natural-log scores s (scores(..., NATURAL=True)) and a natural-log
    lse that broadcasts to s (+inf for rows to zero). s - lse is formed before the change to
    log2 units, so at the row's max key it is -ln(l) up to lse's own rounding (P = 1 / l; exactly
    1 for a one-hot row) where folding log2(e) into both sides first would add ~ulp(s). It is
    <= 0 whenever the backward's q.k equals the forward's bit for bit; the clamp keeps P <= 1
    (no inf) should a GPU's MMA ever round them differently."""
    return tl.exp2(tl.minimum(s - lse, 0.0) * 1.4426950408889634)


@triton.jit
def kv_len_of(KeyLens, b, Sk, HAS_KL: tl.constexpr):
    """Number of keys batch `b` may attend to (Sk without key_lengths)."""
    kv_len = Sk
    if HAS_KL:
        kv_len = tl.minimum(tl.load(KeyLens + b).to(tl.int32), Sk)
        kv_len = tl.maximum(kv_len, 0)
    return kv_len


@triton.jit
def kv_range(row_lo, row_hi, kv_len, shift, window_left, window_right,
             BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
             HAS_WR: tl.constexpr):
    """[lo, hi) of key blocks that rows [row_lo, row_hi) can see; lo is BLOCK_N aligned.

    Blocks outside it are fully masked and skipped, not just masked.
    """
    lo = 0
    hi = kv_len
    if IS_CAUSAL:
        hi = tl.minimum(hi, row_hi + shift)           # j <= i + shift
    if HAS_WR:
        hi = tl.minimum(hi, row_hi + shift + window_right)
    if HAS_WL:
        lo = tl.maximum(row_lo + shift - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def q_range(col_lo, col_hi, Sq, shift, window_left, window_right,
            BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
            HAS_WR: tl.constexpr):
    """[lo, hi) of query rows that can see some key in [col_lo, col_hi); lo is BLOCK_M aligned."""
    lo = 0
    hi = Sq
    if IS_CAUSAL:
        lo = tl.maximum(lo, col_lo - shift)           # i >= j - shift
    if HAS_WR:
        lo = tl.maximum(lo, col_lo - shift - window_right)
    if HAS_WL:
        hi = tl.minimum(hi, col_hi - shift + window_left)   # i <= j - shift + wl
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@triton.jit
def alibi_slope(Alibi, b, H, h, HAS_ALIBI: tl.constexpr):
    """Slope of batch b, query head h (h may be a tensor of heads) from the (B, H) fp32 slopes;
    0.0 (unused) without ALiBi."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b.to(tl.int64) * H + h)
    return slope


@triton.jit
def scores(qk, rows, cols, mask_base, stride_mm, stride_mn, Sq, kv_len, shift,
           window_left, window_right, sm_scale, softcap,
           IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
           MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NATURAL: tl.constexpr = False,
           slope=0.0, HAS_ALIBI: tl.constexpr = False):
    """Raw dot products -> (s2, t), for either tile orientation.

    qk: fp32 q.k tile; rows / cols: query / key indices as 2-D tensors that broadcast to qk's
    shape ((BLOCK_M, 1) and (1, BLOCK_N), or transposed for a (BLOCK_N, BLOCK_M) tile).
    s2: scores in log2 units, -inf where the key is invisible. t: tanh(s/softcap) for the
    softcap gradient (qk itself when there is no softcap; unused then).
    NATURAL: s2 taken to natural log as fl(s2 * ln2), the rounding natural_lse applies to the
    row max (for probs_from_lse); the visibility select after it keeps the product from being
    fused into the caller's subtraction of lse.
    HAS_ALIBI: the bias -slope * |row + shift - col| (after softcap, before a float mask), in
    log2 units; slope broadcasts to qk (a scalar, or (rows, 1) per-row slopes).
    """
    if HAS_SOFTCAP:
        t = tanh_approx_free(qk * (sm_scale / softcap))
        s2 = t * (softcap * 1.4426950408889634)
    else:
        t = qk
        s2 = qk * (sm_scale * 1.4426950408889634)
    if HAS_ALIBI:
        dist = tl.abs(rows + shift - cols).to(tl.float32)             # |i + shift - j|
        s2 = s2 - dist * (slope * 1.4426950408889634)
    vis = cols < kv_len
    if IS_CAUSAL:
        vis = vis & (cols <= rows + shift)
    if HAS_WL:
        vis = vis & (cols >= rows + (shift - window_left))
    if HAS_WR:
        vis = vis & (cols <= rows + (shift + window_right))
    if MASK_KIND != 0:
        m_ptrs = mask_base + rows.to(tl.int64) * stride_mm + cols.to(tl.int64) * stride_mn
        in_bounds = (rows < Sq) & (cols < kv_len)
        if MASK_KIND == 1:
            vis = vis & (tl.load(m_ptrs, mask=in_bounds, other=0) != 0)
        else:
            fm = tl.load(m_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
            s2 = s2 + fm * 1.4426950408889634
    if NATURAL:
        s2 = s2 * 0.6931471805599453                                  # fl(s2 * ln2)
    s2 = tl.where(vis, s2, float("-inf"))
    return s2, t


@triton.jit
def dropout_keep(seed, rng_offset, bh, Sq, Sk, rows, cols, dropout_p):
    """Keep-mask from philox keyed by (seed, offset + linear index), shaped like rows x cols.

    rows / cols: 2-D query / key index tensors (either orientation, as in `scores`).
    Linear index ((b*H + h)*Sq + i)*Sk + j in int64, so the backward regenerates it exactly.
    """
    idx = (bh.to(tl.int64) * Sq + rows.to(tl.int64)) * Sk + cols.to(tl.int64) + rng_offset
    return tl.rand(seed, idx) >= dropout_p


@triton.jit
def dropout_rng(Rng, HAS_DROPOUT: tl.constexpr):
    """(seed, offset) of the dropout RNG, loaded from Rng: int64 [seed, offset] on the device
    (the launchers pass them as a tensor, so no host read is needed and torch.compile can trace
    the launch). Without dropout Rng is a dummy pointer that is never read."""
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
    else:
        seed = 0
        rng_offset = 0
    return seed, rng_offset


@triton.jit
def dropout_mask_kernel(Out, seed, rng_offset, Sq, Sk, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materialise the keep-mask (B*H, Sq, Sk) as uint8, for tests and debugging."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, rng_offset, bh, Sq, Sk, offs_m[:, None], offs_n[None, :],
                        dropout_p)                                     # (BLOCK_M, BLOCK_N)
    ptrs = (Out + (bh.to(tl.int64) * Sq + offs_m[:, None].to(tl.int64)) * Sk
            + offs_n[None, :])
    ok = (offs_m[:, None] < Sq) & (offs_n[None, :] < Sk)
    tl.store(ptrs, keep.to(tl.uint8), mask=ok)
