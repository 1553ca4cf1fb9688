"""KV-cache (decoding) attention in Triton: split-K over a contiguous or paged cache.

Implements the "KV-cache attention" section of docs/backend-contract.md:

    kvcache_attention_forward(q, k_cache, v_cache, *, cache_seqlens, seqlen_new, block_table,
                              cache_batch_idx, scale, causal, window_left, window_right,
                              softcap) -> (out (B, Sq, H, D), lse (B, H, Sq) fp32)
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
stream are ordered, so reuse is safe). The kernel clamps every index it follows (lengths to the
cache capacity, pages and batch rows to the cache) so even unchecked input cannot make it read
out of bounds.
"""

import torch
import triton
import triton.language as tl

from . import _attention_configs as cfg
from ._attention_common import head_mask, kv_range, scores, tile
from ._attention_configs import MERGE_BLOCK_S, decode_tiles
from ._attention_decode import attn_decode_merge_kernel
from .attention import MAX_HEAD_DIM, _dot_precision, _rows_aligned
from .static_variant import StaticVariant


@triton.jit
def kvcache_split_kernel(
    Q, K, V, OPart, LPart, SeqLens, BlockTable, BatchIdx,
    stride_qb, stride_qs, stride_qh,
    stride_kp, stride_kr, stride_kh,
    stride_vp, stride_vr, stride_vh,
    stride_bt,
    H, Hkv, Sq, D, group, seqlen_new, capacity, block_size, n_pages,
    window_left, window_right, sm_scale, softcap, chunk, num_splits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, ALIGNED: tl.constexpr, PAGED: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
):
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
    offs_rc = tl.where(r_ok, offs_r, 0)        # padded rows repeat row 0; never stored
    g = offs_rc // Sq
    offs_i = offs_rc % Sq                                              # (BLOCK_M,) query index
    h = hk * group + g                                                # (BLOCK_M,) query head
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
                        IS_CAUSAL, HAS_WL, HAS_WR, 0, HAS_SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s2 - m_safe[:, None])                             # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(tile(v_head + v_rows, offs_d, ALIGNED), mask=n_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc * tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    # partials as the merge kernel reads them: (B*H, num_splits, Sq, BLOCK_D) and
    # (B*H, num_splits, Sq), lse in log2 units
    prow = ((b * H + h).to(tl.int64) * num_splits + split) * Sq + offs_i   # (BLOCK_M,)
    tl.store(tile(OPart + prow[:, None] * BLOCK_D, offs_d, True), out, mask=r_ok[:, None] & d_ok)
    tl.store(LPart + prow, lse2, mask=r_ok)


# ----------------------------------------------------------------------------- launcher

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WORKSPACE = {}
_WORKSPACE_LIMIT = 16          # cached (device, stream, shape) entries before the cache resets


def _workspace(device, shape_o, shape_l):
    """fp32 partial buffers for (device, current stream, shapes), reused across calls."""
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


def _num_splits(programs, n_blocks, device):
    if cfg.interpreting():
        return min(4, n_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, triton.cdiv(2 * sms, programs), 128))


def kvcache_attention_forward(q, k_cache, v_cache, *, cache_seqlens, seqlen_new, block_table,
                              cache_batch_idx, scale, causal, window_left, window_right,
                              softcap, num_splits=None):
    """out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) fp32 (natural log, -inf for empty rows).

    `num_splits` overrides the number of cache splits (default: enough programs for 2 waves).
    """
    B, Sq, H, D = q.shape
    Hkv = k_cache.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {D} above {MAX_HEAD_DIM}")
    out = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    if B * Sq * H == 0:
        return out, lse
    paged = block_table is not None
    block_size = k_cache.shape[1]
    capacity = block_table.shape[1] * block_size if paged else k_cache.shape[1]
    group = H // Hkv
    prec = _dot_precision(q.dtype)
    arch = None if cfg.interpreting() else cfg.device_arch(q)
    bm, bn, warps, stages = decode_tiles(group, Sq, D, q.element_size(), prec=prec, arch=arch)
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
    num_splits = max(1, min(int(num_splits), n_blocks, 1024))
    chunk = triton.cdiv(triton.cdiv(max(capacity, 1), num_splits), bn) * bn   # BLOCK_N aligned
    num_splits = max(1, triton.cdiv(capacity, chunk))
    opart, lpart = _workspace(q.device, (B * H, num_splits, Sq, block_d),
                              (B * H, num_splits, Sq))
    seqlens = cache_seqlens
    bt = block_table if paged else seqlens                           # dummy pointer
    bidx = cache_batch_idx if cache_batch_idx is not None else seqlens
    kvcache_split_kernel[(programs * num_splits,)](
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
        DOT_PREC=prec, num_warps=warps, num_stages=stages)
    # out (B, Sq, H, D) seen as (b, h, i) by the merge kernel's strides
    attn_decode_merge_kernel[(B * H * Sq,)](
        opart, lpart, out, lse, out.stride(0), out.stride(2), out.stride(1), H, Sq, D,
        num_splits, BLOCK_S=MERGE_BLOCK_S, BLOCK_D=block_d, num_warps=4)
    return out, lse


def unsupported(op, **case):
    """Reason this backend cannot run the case, or None."""
    if op != "kvcache_attention":
        return f"op {op!r} is not kvcache_attention"
    dtype, device = case.get("dtype"), case.get("device")
    if dtype is not None and dtype not in _DTYPES:
        return f"dtype {dtype}"
    if device is not None:
        device = torch.device(device)
        if device.type == "cpu" and not cfg.interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"device {device.type}"
        if device.type == "cuda" and torch.cuda.is_available() \
                and torch.cuda.get_device_capability(device) < (8, 0):
            return "needs compute capability 8.0 or newer"
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
        elif name in ("OPart", "LPart"):
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
    decode path's and is reported there)."""
    out = []
    for label, (sig_dtype, elem, prec) in _SIG_DTYPES.items():
        for block_d in (64, 128, 256):
            tiles = sorted({decode_tiles(rows, 1, block_d, elem, interpret=False, prec=prec,
                                         arch=arch) for rows in (16, 32, 64)})
            for bm, bn, w, s in tiles:
                for paged in (False, True):
                    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, EVEN_D=True,
                                  ALIGNED=True, PAGED=paged, HAS_BATCH_IDX=not paged,
                                  IS_CAUSAL=True, HAS_WL=False, HAS_WR=False,
                                  HAS_SOFTCAP=False, DOT_PREC=prec)
                    out.append(StaticVariant(
                        kernel=kvcache_split_kernel, name="kvcache_split",
                        config=f"{label} d={block_d} {'paged' if paged else 'contiguous'} "
                               f"BM={bm} BN={bn} w={w} s={s}",
                        signature=_signature(sig_dtype, consts), constexprs=consts,
                        num_warps=w, num_stages=s))
    return out
