"""KV-cache (decoding) attention in Triton: split-K over a contiguous or paged cache.

Implements the "KV-cache attention" section of docs/backend-contract.md:

    kvcache_attention_forward(q, k_cache, v_cache, *, cache_seqlens, seqlen_new, block_table,
                              cache_batch_idx, scale, causal, window_left, window_right,
                              softcap, alibi_slopes=None)
        -> (out (B, Sq, H, D), lse (B, H, Sq) fp32)
    unsupported(op, **case) -> str | None
    static_variants(arch) -> list[StaticVariant]

Stage 1 (`kvcache_split_kernel`) gives each program one (batch, kv head, block of packed query
rows, cache split): the rows are the (query head of the GQA group, query index) pairs sharing
the kv head, so the group fills the tensor-core tile (padded to 16 rows) and each K/V row is
read once per group. Keys are addressed through block_table (paged: page
block_table[b, n // block_size], row n % block_size) or cache_batch_idx (contiguous). Each
split writes a partial (out, lse); stage 2 is the dense decode path's merge kernel
(_attention_decode.attn_decode_merge_kernel), which combines them with the log-sum-exp rule.

No host synchronisation: lengths are read by the kernel (cache_seqlens[b] + seqlen_new), grid
and split count come from shapes only. Workspace: the fp32 partials (B*H, splits, Sq, BLOCK_D)
and (B*H, splits, Sq) are cached per (device, stream, shape) and reused by later calls, so a
steady decode loop allocates only its outputs (capture-safe under CUDA graphs; calls on one
stream are ordered, so reuse is safe; run one eager call of each shape before capturing, so the
buffers come from the ordinary pool rather than the graph's). The kernel clamps every index it follows (lengths to the
cache capacity, pages and batch rows to the cache) so even unchecked input cannot make it read
out of bounds.
"""

import torch
import triton
import triton.language as tl

from . import _attention_configs as cfg
from ._attention_common import (alibi_slope, head_mask, kv_range, online_softmax_step, scores,
                                tile)
from ._attention_configs import decode_tiles
from ._attention_decode import (merge_split_partials, split_chunks, split_program,
                                store_split_partial)
from ._compat import interpreting, launch, tracing_triton_op
from ._support import device_reason
from .attention import (MAX_HEAD_DIM, MIN_CAPABILITY, _dot_precision, _rows_aligned,
                        alibi_kernel_args)
from .static_variant import StaticVariant


@triton.jit
def kvcache_split_kernel(
    Q, K, V, OPart, LPart, SeqLens, BlockTable, BatchIdx,
    stride_qb, stride_qs, stride_qh,
    stride_kp, stride_kr, stride_kh,
    stride_vp, stride_vr, stride_vh,
    stride_bt,
    H, Hkv, Sq, D, group, seqlen_new, capacity, block_size, n_pages,
    window_left, window_right, sm_scale, softcap, chunk, num_splits, Alibi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, ALIGNED: tl.constexpr, PAGED: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_ALIBI: tl.constexpr = False,
):
    b, hk, split, h, offs_i, r_ok = split_program(group, Sq, Hkv, num_splits, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = head_mask(offs_d, D, BLOCK_D, EVEN_D, ALIGNED,
                     Q.dtype.element_ty.primitive_bitwidth)          # (1, BLOCK_D)
    q = tl.load(tile(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh
                     + offs_i[:, None].to(tl.int64) * stride_qs, offs_d, ALIGNED),
                mask=r_ok[:, None] & d_ok, other=0.0)                # (BLOCK_M, BLOCK_D)

    # keys of batch b: cache_seqlens[b] + seqlen_new, clamped to the cache (never past it)
    kv_len = tl.load(SeqLens + b).to(tl.int32) + seqlen_new
    kv_len = tl.maximum(tl.minimum(kv_len, capacity), 0)
    shift = kv_len - Sq                                               # bottom-right
    lo, hi = kv_range(0, Sq, kv_len, shift, window_left, window_right,
                      BLOCK_N, IS_CAUSAL, HAS_WL, HAS_WR)
    lo = tl.maximum(lo, split * chunk)                                # chunk is BLOCK_N aligned
    hi = tl.minimum(hi, split * chunk + chunk)

    page0 = b.to(tl.int64)
    if HAS_BATCH_IDX:
        page0 = tl.load(BatchIdx + b).to(tl.int64)
    page0 = tl.minimum(tl.maximum(page0, 0), n_pages - 1)
    k_head = K + hk.to(tl.int64) * stride_kh
    v_head = V + hk.to(tl.int64) * stride_vh
    slope = alibi_slope(Alibi, b, H, h, HAS_ALIBI)                     # (BLOCK_M,) per row
    if HAS_ALIBI:
        slope = slope[:, None]                                        # (BLOCK_M, 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                    # (BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0                                     # (BLOCK_N,) positions
        n_in = offs_n < kv_len
        if PAGED:
            page = tl.load(BlockTable + b.to(tl.int64) * stride_bt + offs_n // block_size,
                           mask=n_in, other=0).to(tl.int64)
            page = tl.minimum(tl.maximum(page, 0), n_pages - 1)
            row = (offs_n % block_size).to(tl.int64)
        else:
            page = page0
            row = offs_n.to(tl.int64)
        k_rows = (page * stride_kp + row * stride_kr)[:, None]        # (BLOCK_N, 1)
        v_rows = (page * stride_vp + row * stride_vr)[:, None]
        n_ok = n_in[:, None] & d_ok
        k = tl.load(tile(k_head + k_rows, offs_d, ALIGNED), mask=n_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)         # (BLOCK_M, BLOCK_N)
        s2, _t = scores(qk, offs_i[:, None], offs_n[None, :], Q, 0, 0, Sq, kv_len, shift,
                        window_left, window_right, sm_scale, softcap,
                        IS_CAUSAL, HAS_WL, HAS_WR, 0, HAS_SOFTCAP, slope=slope,
                        HAS_ALIBI=HAS_ALIBI)
        p, alpha, m_new, l_i = online_softmax_step(s2, m_i, l_i)      # p (BLOCK_M, BLOCK_N)
        v = tl.load(tile(v_head + v_rows, offs_d, ALIGNED), mask=n_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    store_split_partial(OPart, LPart, acc, m_i, l_i, b, H, h, split, num_splits, Sq, offs_i,
                        r_ok, offs_d, d_ok, BLOCK_D)


# ----------------------------------------------------------------------------- launcher

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WORKSPACE = {}
_WORKSPACE_LIMIT = 16          # cached (device, stream, shape) entries before the cache resets


def _workspace(device, shape_o, shape_l):
    """fp32 partial buffers for (device, current stream, shapes), reused across calls; fresh
    ones while torch.compile traces the launcher (a graph owns its buffers: a cached tensor
    would be a constant of the graph, shared by every compiled call)."""
    if tracing_triton_op():
        return (torch.empty(shape_o, device=device, dtype=torch.float32),
                torch.empty(shape_l, device=device, dtype=torch.float32))
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (str(device), stream, shape_o)
    buf = _WORKSPACE.get(key)
    if buf is None:
        if len(_WORKSPACE) >= _WORKSPACE_LIMIT:
            _WORKSPACE.clear()
        buf = (torch.empty(shape_o, device=device, dtype=torch.float32),
               torch.empty(shape_l, device=device, dtype=torch.float32))
        _WORKSPACE[key] = buf
    return buf


def kv_tiles(group, Sq, D, elem, prec, arch, paged, alibi=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): the dense decode tiles, except that a paged
    cache keeps at most 2 stages (its per-row page addresses cost the registers a third stage
    needs: fp16 d=128 BM=64 BN=64 s=3 spilled on sm_80), and that with ALiBi an IEEE fp32 tile
    of 8 warps takes 2 stages, not 1 (16x16 w=8 s=1 spilled on sm_90 at d=128; s=2: 68
    registers, clean)."""
    bm, bn, warps, stages = decode_tiles(group, Sq, D, elem, prec=prec, arch=arch)
    if alibi and arch is not None and elem == 4 and prec == "ieee" and warps == 8:
        stages = max(stages, 2)
    if paged and arch is not None:
        stages = min(stages, 2)
        if arch < 90 and elem == 2 and bm == 64 and bn == 64:
            bn = 32     # 16-bit d=128 BM=64 BN=64 spilled on sm_80 with 2 stages too
    if elem == 4 and prec == "ieee" and arch is not None:
        # fp32 CUDA-core dots (no MMA either way): three dense-decode tiles spilled 1-4
        # registers here (static report); the row tile BM is kept, since a smaller one makes
        # each kv head's K/V be read once more per extra row block.
        bd = cfg.block_d_of(D)
        if arch < 90 and bd <= 64 and bm == 32:
            stages = 1      # sm_80 d=64 BM=32 w=4 s=2: 1 spill; s=1: none (128 regs)
        if arch >= 90 and bd == 128 and bm == 32:
            warps = 16      # sm_90 d=128 BM=32 w=8 s=1: 1 spill; w=16: none (64 regs)
        if arch >= 90 and paged and bd > 128:
            stages = 1      # sm_90 d=256 paged BM=16 w=4 s=2: 4 spills; s=1: none (184 regs)
    return bm, bn, warps, stages


def _num_splits(programs, n_blocks, device):
    if interpreting():
        return min(4, n_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, triton.cdiv(2 * sms, programs), 128))


def kvcache_attention_forward(q, k_cache, v_cache, *, cache_seqlens, seqlen_new, block_table,
                              cache_batch_idx, scale, causal, window_left, window_right,
                              softcap, num_splits=None, alibi_slopes=None):
    """out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) fp32 (natural log, -inf for empty rows).

    `num_splits` overrides the number of cache splits (default: enough programs for 2 waves).
    """
    B, Sq, H, D = q.shape
    Hkv = k_cache.shape[2]
    assert D <= MAX_HEAD_DIM        # fastattn.kvcache_attention validates; unsupported() checks
    out = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    if B * Sq * H == 0:
        return out, lse
    paged = block_table is not None
    block_size = k_cache.shape[1]
    capacity = block_table.shape[1] * block_size if paged else k_cache.shape[1]
    group = H // Hkv
    prec = _dot_precision(q.dtype)
    arch = None if interpreting() else cfg.device_arch(q)
    bm, bn, warps, stages = kv_tiles(group, Sq, D, q.element_size(), prec, arch, paged,
                                     alibi_slopes is not None)
    block_d = cfg.block_d_of(D)
    aligned = (D * q.element_size()) % 16 == 0 and all(
        _rows_aligned(t) for t in (q, k_cache, v_cache))
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache, v_cache: the head dim must be contiguous (stride 1)")

    n_blocks = max(1, triton.cdiv(capacity, bn))
    programs = B * Hkv * triton.cdiv(group * Sq, bm)
    if num_splits is None:
        num_splits = _num_splits(programs, n_blocks, q.device)
    chunk, num_splits = split_chunks(capacity, bn, num_splits)
    opart, lpart = _workspace(q.device, (B * H, num_splits, Sq, block_d),
                              (B * H, num_splits, Sq))
    seqlens = cache_seqlens
    bt = block_table if paged else seqlens                           # dummy pointer
    bidx = cache_batch_idx if cache_batch_idx is not None else seqlens
    launch(kvcache_split_kernel)[(programs * num_splits,)](
        q, k_cache, v_cache, opart, lpart, seqlens, bt, bidx,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0) if paged else 0,
        H, Hkv, Sq, D, group, int(seqlen_new), capacity, block_size, k_cache.shape[0],
        int(window_left), int(window_right), float(scale), float(softcap), chunk, num_splits,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, EVEN_D=D == block_d, ALIGNED=aligned,
        PAGED=paged, HAS_BATCH_IDX=cache_batch_idx is not None, IS_CAUSAL=bool(causal),
        HAS_WL=window_left >= 0, HAS_WR=window_right >= 0, HAS_SOFTCAP=softcap > 0,
        DOT_PREC=prec, num_warps=warps, num_stages=stages,
        **alibi_kernel_args(alibi_slopes, B, H, q))
    # out (B, Sq, H, D) seen as (b, h, i) by the merge kernel's strides
    merge_split_partials(opart, lpart, out, lse, (out.stride(0), out.stride(2), out.stride(1)),
                         H, Sq, D)
    return out, lse


def unsupported(op, **case):
    """Reason this backend cannot run the case, or None."""
    if op != "kvcache_attention":
        return f"op {op!r} is not kvcache_attention"
    dtype, device = case.get("dtype"), case.get("device")
    if dtype is not None and dtype not in _DTYPES:
        return f"dtype {dtype}"
    reason = None if device is None else device_reason(device, MIN_CAPABILITY)
    if reason:
        return reason
    head_dim = case.get("head_dim")
    if head_dim is not None and not 1 <= int(head_dim) <= MAX_HEAD_DIM:
        return f"head dim {head_dim} outside 1..{MAX_HEAD_DIM}"
    return None


# ----------------------------------------------------------------------------- static report

_SIG_DTYPES = {"fp16": ("fp16", 2, "tf32"), "bf16": ("bf16", 2, "tf32"),
               "fp32": ("fp32", 4, "ieee"), "tf32": ("fp32", 4, "tf32")}


def _signature(dtype, constexprs):
    import inspect
    sig = {}
    for name in inspect.signature(kvcache_split_kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("OPart", "LPart", "Alibi"):
            sig[name] = "*fp32"
        elif name in ("Q", "K", "V"):
            sig[name] = "*" + dtype
        elif name in ("SeqLens", "BlockTable", "BatchIdx"):
            sig[name] = "*i32"
        elif name in ("sm_scale", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def static_variants(arch):
    """Every split-kernel configuration the launcher may pick on `arch`: dtype x head-dim block
    x row tile (group * Sq up to 16, 32, 64) x paged, causal (the merge kernel is the dense
    decode path's and is reported there); then ALiBi (HAS_ALIBI) at d=128, paged and not."""
    out = []
    for label, (sig_dtype, elem, prec) in _SIG_DTYPES.items():
        for block_d, even_d in ((64, True), (128, True), (256, True), (128, False)):
            for paged in (False, True):
                tiles = sorted({kv_tiles(rows, 1, block_d, elem, prec, arch, paged)
                                for rows in (16, 32, 64)})
                for bm, bn, w, s in tiles:
                    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, EVEN_D=even_d,
                                  ALIGNED=True, PAGED=paged, HAS_BATCH_IDX=not paged,
                                  IS_CAUSAL=True, HAS_WL=False, HAS_WR=False,
                                  HAS_SOFTCAP=False, DOT_PREC=prec, HAS_ALIBI=False)
                    out.append(StaticVariant(
                        kernel=kvcache_split_kernel, name="kvcache_split",
                        config=f"{label} d={block_d}{'' if even_d else ' padded'} "
                               f"{'paged' if paged else 'contiguous'} "
                               f"BM={bm} BN={bn} w={w} s={s}",
                        signature=_signature(sig_dtype, consts), constexprs=consts,
                        num_warps=w, num_stages=s))
    for label, (sig_dtype, elem, prec) in _SIG_DTYPES.items():
        for paged in (False, True):
            for bm, bn, w, s in sorted({kv_tiles(rows, 1, 128, elem, prec, arch, paged, True)
                                        for rows in (16, 32, 64)}):
                consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128, EVEN_D=True, ALIGNED=True,
                              PAGED=paged, HAS_BATCH_IDX=not paged, IS_CAUSAL=True,
                              HAS_WL=False, HAS_WR=False, HAS_SOFTCAP=False, DOT_PREC=prec,
                              HAS_ALIBI=True)
                out.append(StaticVariant(
                    kernel=kvcache_split_kernel, name="kvcache_split",
                    config=f"{label} d=128 {'paged' if paged else 'contiguous'} alibi "
                           f"BM={bm} BN={bn} w={w} s={s}",
                    signature=_signature(sig_dtype, consts), constexprs=consts,
                    num_warps=w, num_stages=s))
    return out
