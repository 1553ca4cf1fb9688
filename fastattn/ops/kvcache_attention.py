"""KV-cache attention as a torch.library custom op (inference only: no autograd).

`fastattn::kvcache_attention` appends the new keys/values (rotated first when cos/sin are given)
into the caches in place, then attends q to the filled part of the cache, bottom-right causal.
It mutates k_cache and v_cache (declared in mutates_args, so torch.compile functionalises the
append correctly); without new keys they are left untouched. Its Triton twin
(`fastattn_triton::kvcache_attention`, fastattn/ops/_triton.py) declares the same mutation.

The append and the rotation are the same tensor ops on every backend (index_put_ into the cache
at cache_seqlens[b] + t, the backend's own rotary kernel with per-batch offsets): sync-free, so
they also run inside CUDA-graph capture. The attention itself is the backend's
`kvcache_attention_forward` (docs/backend-contract.md). alibi_slopes (last argument): None or
a contiguous fp32 (B, H) tensor.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _triton
from .attention import alibi_kwargs


def _rotate(x, cos, sin, interleaved, offsets, backend):
    """x (B, S, H, D) rotated at positions offsets[b] + s (a new tensor)."""
    impl = _backend.backend_module(backend, "rotary")
    out = torch.empty_like(x)
    impl.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=offsets, conjugate=False,
                        out=out)
    return out


def _cache_rows(cache_seqlens, seqlen_new, block_table, cache_batch_idx, block_size):
    """(page, row) index tensors (B, seqlen_new) of the cache slots new token t of batch b goes
    to: position cache_seqlens[b] + t, through block_table (paged) or cache_batch_idx."""
    b = cache_seqlens.shape[0]
    pos = (cache_seqlens.to(torch.int64).unsqueeze(1)
           + torch.arange(seqlen_new, device=cache_seqlens.device))          # (B, S_new)
    if block_table is not None:
        pages = torch.gather(block_table.to(torch.int64), 1, pos // block_size)
        return pages, pos % block_size
    batch = (cache_batch_idx.to(torch.int64) if cache_batch_idx is not None
             else torch.arange(b, device=cache_seqlens.device))
    return batch.unsqueeze(1).expand(b, seqlen_new), pos


def append_to_cache(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx):
    """Writes k, v (B, S_new, Hkv, D) into the caches at cache_seqlens[b] + t (in place)."""
    pages, rows = _cache_rows(cache_seqlens, k.shape[1], block_table, cache_batch_idx,
                              k_cache.shape[1])
    k_cache.index_put_((pages, rows), k.to(k_cache.dtype))
    v_cache.index_put_((pages, rows), v.to(v_cache.dtype))


def kvcache_attention_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor],
                           v: Optional[Tensor], cache_seqlens: Tensor,
                           block_table: Optional[Tensor], cache_batch_idx: Optional[Tensor],
                           rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor],
                           rotary_interleaved: bool, scale: float, causal: bool,
                           window_left: int, window_right: int, softcap: float,
                           backend: str, alibi_slopes: Optional[Tensor] = None
                           ) -> tuple[Tensor, Tensor]:
    """out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) fp32. Arguments are validated by
    fastattn.kvcache_attention."""
    _backend.log_dispatch("kvcache_attention", backend)
    seqlen_new = 0
    if k is not None:
        seqlen_new = k.shape[1]
        if rotary_cos is not None:
            k = _rotate(k, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens, backend)
            if causal or window_left >= 0 or window_right >= 0:
                # query t sits at position cache_seqlens[b] + t, like the key it came with
                q = _rotate(q, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens,
                            backend)
            else:
                # flash-attn 2: without causal/window every query is rotated at
                # cache_seqlens[b] (all tokens of the batch row at one position)
                b, sq, h, d = q.shape
                q = _rotate(q.reshape(b, 1, sq * h, d), rotary_cos, rotary_sin,
                            rotary_interleaved, cache_seqlens, backend).view(b, sq, h, d)
        append_to_cache(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx)
    impl = _backend.backend_module(backend, "kvcache_attention")
    out, lse = impl.kvcache_attention_forward(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens, seqlen_new=seqlen_new,
        block_table=block_table, cache_batch_idx=cache_batch_idx, scale=scale, causal=causal,
        window_left=window_left, window_right=window_right, softcap=softcap,
        **alibi_kwargs(alibi_slopes))
    return out.contiguous(), lse.contiguous()


kvcache_attention_op = torch.library.custom_op(
    "fastattn::kvcache_attention", kvcache_attention_impl, mutates_args=("k_cache", "v_cache"))


@kvcache_attention_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, rotary_cos,
      rotary_sin, rotary_interleaved, scale, causal, window_left, window_right, softcap, backend,
      alibi_slopes=None):
    b, sq, h, _ = q.shape
    out = q.new_empty(b, sq, h, v_cache.shape[-1])
    lse = q.new_empty(b, h, sq, dtype=torch.float32)
    return out, lse


# torch.compile on the triton backend traces this twin: the append (index_put_, functionalised
# into a copy written back to the caches), the rotary and kvcache kernels as graph nodes
_triton.register(kvcache_attention_op, kvcache_attention_impl, mutates_args=("k_cache", "v_cache"))
