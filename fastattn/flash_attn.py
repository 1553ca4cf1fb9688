"""flash-attn 2's public functions on fastattn's kernels: change one import.

    from flash_attn import flash_attn_func            # before
    from fastattn.flash_attn import flash_attn_func   # after: CPU, and any GPU Triton supports

Same names, signatures, layouts ((batch, seqlen, nheads, headdim); varlen (total, nheads, headdim)
with int32 cu_seqlens) and semantics as flash-attn 2: causal masks and sliding windows are
aligned bottom-right, window_size=(left, right) with -1 = unbounded, softcap > 0 soft-caps the
scores, GQA/MQA when the key/value head count divides the query head count. alibi_slopes
(float32 (nheads,) or (batch, nheads)) adds -slope * |i + seqlen_k - seqlen_q - j| to the
score of query i and key j (after softcap, bottom-right positions, per sequence for varlen),
in the kernels of every backend; the slopes get no gradient.

What differs, always with a ValueError naming the argument, never silently:
  - return_attn_probs=True is not supported (flash-attn documents its S_dmask as a testing aid
    with unreliable scaling; use fastattn.MultiHeadAttention(need_weights=True) for weights).
  - flash_attn_varlen_func(block_table=...) (paged varlen) and
    flash_attn_with_kvcache(cache_leftpad=...) are not supported.
  - num_splits of flash_attn_with_kvcache is a performance hint in flash-attn; fastattn picks its
    own split of the cache and accepts any num_splits >= 0 without changing the result.
The outputs are contiguous in flash-attn's layout. Dropout masks come from fastattn's RNG
(seeded by torch's default generator), so they differ from flash-attn's for the same seed.
"""

import torch

from . import functional as _functional

__all__ = [
    "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
    "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
]


def _reject_unsupported(return_attn_probs=False):
    if return_attn_probs:
        raise ValueError("return_attn_probs=True is not supported by fastattn.flash_attn; use "
                         "fastattn.MultiHeadAttention(need_weights=True) for attention weights")


def _window(window_size):
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise ValueError(f"window_size must be a (left, right) pair of ints (-1 = unbounded), "
                         f"got {window_size!r}")
    left, right = int(window_size[0]), int(window_size[1])
    return None if (left < 0 and right < 0) else (left, right)


def _check_rank(name, t, ndim, layout):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


# ------------------------------------------------------------------------------ dense (B, S, H, D)

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """flash-attn's flash_attn_func: q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, H, D).

    Causal and window are aligned bottom-right: query i sees keys
    [i + Sk - Sq - window_size[0], i + Sk - Sq + window_size[1]] (and none past i + Sk - Sq
    when causal). A query row with no visible key gives 0.
    """
    _reject_unsupported(return_attn_probs)
    _check_rank("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    _check_rank("k", k, 4, "(batch, seqlen_k, nheads_k, headdim)")
    _check_rank("v", v, 4, "(batch, seqlen_k, nheads_k, headdim)")
    out = _functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
        is_causal=bool(causal), scale=softmax_scale, enable_gqa=True,
        window=_window(window_size), softcap=softcap, causal_alignment="bottom_right",
        deterministic=bool(deterministic), alibi_slopes=alibi_slopes)
    return out.transpose(1, 2).contiguous()                     # (B, Sq, H, D)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash-attn's flash_attn_qkvpacked_func: qkv (B, S, 3, H, D) -> out (B, S, H, D)."""
    _check_rank("qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, seqlen, 3, nheads, headdim), got "
                         f"{tuple(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash-attn's flash_attn_kvpacked_func: q (B, Sq, H, D), kv (B, Sk, 2, Hkv, D)."""
    _check_rank("kv", kv, 5, "(batch, seqlen_k, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise ValueError(f"kv must have shape (batch, seqlen_k, 2, nheads_k, headdim), got "
                         f"{tuple(kv.shape)}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


# --------------------------------------------------------------------------- varlen (total, H, D)

def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """flash-attn's flash_attn_varlen_func: q (total_q, H, D), k/v (total_k, Hkv, D),
    cu_seqlens_* int32 (B + 1,) -> out (total_q, H, D); causal/window bottom-right per sequence.
    """
    _reject_unsupported(return_attn_probs)
    if block_table is not None:
        raise ValueError("block_table (a paged varlen KV cache) is not supported by "
                         "fastattn.flash_attn.flash_attn_varlen_func; use "
                         "flash_attn_with_kvcache for paged caches")
    from .varlen import varlen_attention
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p=dropout_p, scale=softmax_scale, is_causal=bool(causal),
                            window=_window(window_size), softcap=softcap,
                            deterministic=bool(deterministic), alibi_slopes=alibi_slopes)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn's flash_attn_varlen_qkvpacked_func: qkv (total, 3, H, D)."""
    _check_rank("qkv", qkv, 4, "(total, 3, nheads, headdim)")
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (total, 3, nheads, headdim), got "
                         f"{tuple(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """flash-attn's flash_attn_varlen_kvpacked_func: q (total_q, H, D), kv (total_k, 2, Hkv, D)."""
    _check_rank("kv", kv, 4, "(total_k, 2, nheads_k, headdim)")
    if kv.shape[1] != 2:
        raise ValueError(f"kv must have shape (total_k, 2, nheads_k, headdim), got "
                         f"{tuple(kv.shape)}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs)


# ---------------------------------------------------------------------------------------- KV cache

def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """flash-attn's flash_attn_with_kvcache (inference only, no autograd).

    q (B, Sq, H, D); k_cache/v_cache (B_cache, S_max, Hkv, D), or paged
    (num_blocks, block_size, Hkv, D) with block_table int32 (B, max_blocks) (any block_size).
    k/v (B, Sq_new, Hkv, D), when given, are written into the cache in place at cache_seqlens
    (rotated first when rotary_cos/sin are given). Rotary positions follow flash-attn: k at
    cache_seqlens + t; q at cache_seqlens + t when causal or windowed, else every query token
    at cache_seqlens. cache_seqlens: int or int32 (B,); None means the whole cache is filled
    (only without k/v and block_table). Returns out (B, Sq, H, D) [, lse (B, H, Sq) fp32].
    """
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad is not supported by fastattn.flash_attn; left-pad with "
                         "cache_seqlens per sequence instead")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    _check_rank("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    _check_rank("k_cache", k_cache, 4, "(batch_cache, seqlen_cache, nheads_k, headdim)")
    batch = q.shape[0]
    if cache_seqlens is None:
        if k is not None or block_table is not None:
            raise ValueError("cache_seqlens is required with k/v or block_table")
        cache_seqlens = k_cache.shape[1]
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32,
                                   device=q.device)
    window = _window(window_size)
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary and (rotary_cos is None or rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary and k is None:
        raise ValueError("rotary_cos/rotary_sin apply to new keys: pass k and v as well")
    from .kvcache import kvcache_attention
    # kvcache_attention follows flash-attn's rotary rule (q at cache_seqlens + t when causal or
    # windowed, else every query token at cache_seqlens).
    return kvcache_attention(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
        cache_batch_idx=cache_batch_idx, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, scale=softmax_scale, is_causal=bool(causal),
        window=window, softcap=softcap, return_lse=bool(return_softmax_lse),
        alibi_slopes=alibi_slopes)
