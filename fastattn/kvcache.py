"""fastattn.kvcache_attention: decoding attention over a (paged) KV cache, flash-attn 2's
`flash_attn_with_kvcache` semantics in fastattn's keyword style."""

import math

import torch

from . import _backend, _checks, _eager
from ._alibi import check_alibi_slopes
from .ops import attention as _attention_ops
from .ops import kvcache_attention as _ops

KVCACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kvcache_attention(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                      cache_batch_idx=None, rotary_cos=None, rotary_sin=None,
                      rotary_interleaved=False, scale=None, is_causal=True, window=None,
                      softcap=0.0, return_lse=False, alibi_slopes=None):
    """Attention of q to a KV cache, appending new keys/values in place first (inference only).

    q: (B, Sq, H, D).
    k_cache, v_cache: contiguous cache (B_cache, S_max, Hkv, D), or a paged cache
      (num_blocks, block_size, Hkv, D) addressed through block_table (any block_size >= 1).
    k, v: optional new keys/values (B, Sq_new, Hkv, D). They are written into the caches IN
      PLACE at positions cache_seqlens[b] .. cache_seqlens[b] + Sq_new - 1 (rotated first when
      rotary_cos/sin are given); attention then covers cache positions
      [0, cache_seqlens[b] + Sq_new). Without k/v it covers [0, cache_seqlens[b]).
    cache_seqlens: int32 tensor (B,) (or a Python int for every batch row): filled length of
      each cache before this call.
    block_table: int32 (B, max_blocks): page j of batch b is k_cache[block_table[b, j]].
    cache_batch_idx: int32 (B,): batch b uses cache row cache_batch_idx[b] of a contiguous cache
      (default: row b). Not with block_table.
    rotary_cos, rotary_sin: (S_rot, R / 2) tables (fastattn.rotary_cache), R <= D; need k/v.
      New key t is rotated at position cache_seqlens[b] + t. Query t is rotated at
      cache_seqlens[b] + t too when is_causal or window is set; otherwise every query of batch
      b is rotated at position cache_seqlens[b] (flash-attn 2's rules, also when Sq != Sq_new). rotary_interleaved: GPT-J pairs
      (2i, 2i+1) instead of NeoX halves (i, i + R/2).
    scale: logit scale, default 1 / sqrt(D).
    is_causal, window: bottom-right aligned over the filled cache: query i of batch b sits at
      key position L_b - Sq + i with L_b = cache_seqlens[b] + Sq_new; causal hides keys after
      it, window=(left, right) (or an int for both, -1 = unbounded) keeps keys in
      [pos - left, pos + right].
    softcap: logits = softcap * tanh(logits / softcap) (0 = off).
    return_lse: also return lse (B, H, Sq) fp32, natural log (flash-attn's softmax_lse layout);
      -inf for rows that see no key (their output is 0).
    alibi_slopes: float32 (H,) or (B, H) on q's device, or None: ALiBi (flash-attn 2's), the
      score of query i (at position L_b - Sq + i) and cache position j of head h gets
      -alibi_slopes[b, h] * |L_b - Sq + i - j| added after softcap.

    GQA/MQA when Hkv divides H (K/V are not repeated). Returns out (B, Sq, H, D) in q's dtype
    (and lse). No autograd: a RuntimeError is raised if an input requires grad while grad mode
    is on. Checking cache_seqlens, block_table and cache_batch_idx against the cache bounds
    reads them on the host (one device sync per eager call; skipped under torch.compile, where
    the kernels clamp instead of reading out of bounds). The kernels themselves never sync.
    """
    if (k is None and v is None and block_table is None and cache_batch_idx is None
            and rotary_cos is None and rotary_sin is None and window is None
            and alibi_slopes is None and not return_lse and not torch.compiler.is_compiling()):
        out = _eager.kvcache_attention(q, k_cache, v_cache, cache_seqlens, scale, is_causal,
                                       softcap)
        if out is not None:
            return out
    _checks.check_tensor("q", q, ndim=4, dtypes=KVCACHE_DTYPES)
    _checks.check_tensor("k_cache", k_cache, ndim=4, dtypes=KVCACHE_DTYPES)
    _checks.check_tensor("v_cache", v_cache, ndim=4, dtypes=KVCACHE_DTYPES)
    _checks.check_same("k_cache", k_cache, "q", q)
    _checks.check_same("v_cache", v_cache, "q", q)
    B, Sq, H, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got "
                         f"{tuple(v_cache.shape)}")
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} != q head dim {D}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k_cache: kv heads ({Hkv}) must divide q's heads ({H})")
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k),
                        ("v", v)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"kvcache_attention is inference only (no autograd), but "
                                   f"{name} requires grad; call it under torch.no_grad()")

    paged = block_table is not None
    if paged:
        _checks.check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
        if block_table.device != q.device:
            raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}")
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must have {B} rows (q's batch), got "
                             f"{tuple(block_table.shape)}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (a paged "
                             "cache is addressed through block_table alone)")
        if k_cache.shape[1] < 1:
            raise ValueError("k_cache: a paged cache needs block_size >= 1")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            _checks.check_tensor("cache_batch_idx", cache_batch_idx, ndim=1,
                                 dtypes=(torch.int32,))
            if cache_batch_idx.shape[0] != B or cache_batch_idx.device != q.device:
                raise ValueError(f"cache_batch_idx must be a ({B},) tensor on {q.device}, got "
                                 f"{tuple(cache_batch_idx.shape)} on {cache_batch_idx.device}")
        elif k_cache.shape[0] != B:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has {B} (pass "
                             f"cache_batch_idx to pick cache rows)")

    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    _checks.check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,))
    if cache_seqlens.shape[0] != B or cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be a ({B},) tensor on {q.device}, got "
                         f"{tuple(cache_seqlens.shape)} on {cache_seqlens.device}")

    seqlen_new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _checks.check_tensor(name, t, ndim=4, dtypes=KVCACHE_DTYPES)
            _checks.check_same(name, t, "q", q)
            if t.shape[0] != B or t.shape[2:] != k_cache.shape[2:] or t.shape != k.shape:
                raise ValueError(f"{name} must have shape ({B}, Sq_new, {Hkv}, {D}) like k, "
                                 f"got {tuple(t.shape)}")
        seqlen_new = k.shape[1]
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need new keys k/v to rotate")
        _checks.check_tensor("rotary_cos", rotary_cos, ndim=2)
        _checks.check_tensor("rotary_sin", rotary_sin, ndim=2)
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"rotary_sin must have rotary_cos's shape "
                             f"{tuple(rotary_cos.shape)}, got {tuple(rotary_sin.shape)}")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if 2 * rotary_cos.shape[1] > D:
            raise ValueError(f"rotary_cos rotates {2 * rotary_cos.shape[1]} features "
                             f"(2 * shape[1]) but the head dim is {D}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    window_left, window_right = _checks.window_pair(window)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    alibi_slopes = check_alibi_slopes(alibi_slopes, B, H, q.device)

    if not torch.compiler.is_compiling():
        local = is_causal or window_left >= 0 or window_right >= 0
        rotated = max(seqlen_new, Sq if local else 1)      # positions past cache_seqlens[b]
        _check_data(cache_seqlens, seqlen_new, capacity, block_table, k_cache.shape,
                    cache_batch_idx, rotary_cos, rotated)

    backend = _backend.select(
        "kvcache_attention", q.device.type, dtype=q.dtype, head_dim=D, paged=paged,
        alibi=alibi_slopes is not None, device=q.device.type)
    out, lse = _backend.eager_call(
        _ops.kvcache_attention_op, _ops.kvcache_attention_impl, backend,
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, rotary_cos,
        rotary_sin, bool(rotary_interleaved), scale, bool(is_causal), window_left,
        window_right, float(softcap), backend, *_attention_ops.alibi_arg(alibi_slopes))
    return (out, lse) if return_lse else out


def _check_data(cache_seqlens, seqlen_new, capacity, block_table, cache_shape, cache_batch_idx,
                rotary_cos, rotated):
    """Bounds of the index tensors' values: one host sync for all of them."""
    if cache_seqlens.numel() == 0:
        return
    lens = cache_seqlens.to(torch.int64)
    stats = [lens.min(), lens.max()]
    if block_table is not None:
        # only the pages this call reads or writes must be valid (servers leave the rest as -1)
        block_size = cache_shape[1]
        used = (torch.arange(block_table.shape[1], device=lens.device).unsqueeze(0)
                < ((lens.clamp(min=0) + seqlen_new + block_size - 1) // block_size).unsqueeze(1))
        entries = block_table.to(torch.int64)
        stats += [torch.where(used, entries, 0).min(), torch.where(used, entries, 0).max()]
    if cache_batch_idx is not None and cache_batch_idx.numel():
        stats += [cache_batch_idx.min().to(torch.int64), cache_batch_idx.max().to(torch.int64)]
    values = torch.stack(stats).tolist()
    lo, hi = values[0], values[1]
    if lo < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got a minimum of {lo}")
    if hi + seqlen_new > capacity:
        what = ("max_blocks * block_size" if block_table is not None else "S_max (k_cache.shape[1])")
        raise ValueError(f"cache_seqlens + Sq_new must be <= {what} = {capacity}, got "
                         f"{hi} + {seqlen_new}")
    rest = values[2:]
    if block_table is not None:
        blo, bhi = rest[:2]
        rest = rest[2:]
        if blo < 0 or bhi >= cache_shape[0]:
            raise ValueError(f"block_table entries used by this call must lie in [0, "
                             f"num_blocks={cache_shape[0]}), got values in [{blo}, {bhi}]")
    if cache_batch_idx is not None and rest:
        clo, chi = rest
        if clo < 0 or chi >= cache_shape[0]:
            raise ValueError(f"cache_batch_idx entries must lie in [0, {cache_shape[0]}) "
                             f"(k_cache's batch), got values in [{clo}, {chi}]")
    if rotary_cos is not None and hi + rotated > rotary_cos.shape[0]:
        raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} positions but positions up to "
                         f"{hi + rotated - 1} are rotated (cache_seqlens + max(Sq_new, Sq))")
