"""The "fastattn" attention function for Hugging Face transformers (AttentionInterface).

transformers calls it as `fn(module, query, key, value, attention_mask, dropout=, scaling=,
sliding_window=, softcap=, s_aux=, **kwargs)` with query (B, H, Sq, D) and key/value
(B, Hkv, Sk, D) (K/V never repeated: GQA runs on the kernels' grouped path), and expects
(out (B, Sq, H, D), None). The mask comes from the "fastattn" entry of AttentionMaskInterface,
which is transformers' own sdpa mask: None where a plain causal mask suffices, else a boolean
(B, 1, Sq, Sk) mask (True = attend) that already encodes causality, sliding windows, padding
and packed sequences.

Routes (see `record_routes`):
  "varlen"  padding-free packed batch (cu_seq_lens_q/k kwargs, or position_ids restarting at 0)
            -> fastattn.varlen_attention, one call over all sequences (no (S, S) mask).
  "decode"  Sq < Sk with no mask (a cached decode step) -> fastattn.kvcache_attention over
            transformers' cache tensors in place (split-K over the cache; bottom-right causal),
            or the dense kernel's decode path when gradients are needed.
  "dense"   no mask, Sq == Sk (or an empty static cache) -> causal dense kernel, window from
            sliding_window.
  "masked"  a boolean/float mask (padding, custom patterns) -> dense kernel with the mask.
Nothing here imports transformers; this file only needs torch and fastattn.
"""

import contextlib
import contextvars

import torch

from .. import functional as _functional

_route_logs = contextvars.ContextVar("fastattn_hf_route_logs", default=())


@contextlib.contextmanager
def record_routes():
    """Collect the route name ("varlen", "decode", "dense", "masked") of every call of the
    attention function inside the block."""
    log = []
    token = _route_logs.set(_route_logs.get() + (log,))
    try:
        yield log
    finally:
        _route_logs.reset(token)


def _log_route(name):
    for log in _route_logs.get():
        log.append(name)


def _varlen_fn():
    import fastattn
    return getattr(fastattn, "varlen_attention", None)


def _kvcache_fn():
    import fastattn
    return getattr(fastattn, "kvcache_attention", None)


def _cu_seqlens_from_position_ids(position_ids):
    """cu_seqlens (int32, (N + 1,)) and the longest length of the sequences packed along one
    row of position_ids (1, S): a new sequence starts wherever the position does not grow by
    one (transformers' own rule, find_packed_sequence_indices). Cached on the tensor: every
    layer of one forward sees the same position_ids."""
    cached = getattr(position_ids, "_fastattn_cu_seqlens", None)
    if cached is not None:
        return cached
    pos = position_ids.reshape(-1)
    total = pos.shape[0]
    starts = torch.nonzero(pos[1:] - pos[:-1] != 1).reshape(-1) + 1
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), total)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if total else 0
    result = (cu, max_len)
    try:
        position_ids._fastattn_cu_seqlens = result
    except (AttributeError, RuntimeError):  # a tensor that refuses attributes: recompute
        pass
    return result


def _packed_layout(query, key, attention_mask, kwargs):
    """(cu_q, cu_k, max_q, max_k) for a padding-free packed batch, else None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        return cu_q, cu_k, max_q, max_k
    position_ids = kwargs.get("position_ids")
    # As transformers' flash-attention path: one row whose positions restart is a packed
    # batch, whether or not a block-diagonal mask was built (transformers skips it when the
    # model made a cache, e.g. use_cache=True in training). Only without cached keys
    # (Sq == Sk); never under torch.compile (reading the positions is data-dependent).
    if (position_ids is None or query.shape[0] != 1
            or query.shape[2] != key.shape[2] or query.shape[2] < 2
            or position_ids.numel() != query.shape[2] or torch.compiler.is_compiling()):
        return None
    cu, max_len = _cu_seqlens_from_position_ids(position_ids)
    if cu.shape[0] <= 2:
        return None                      # one sequence: not packed
    return cu, cu, max_len, max_len


def _block_causal_mask(cu, length, device):
    """(1, 1, S, S) bool mask of causal attention within each packed sequence."""
    seq = torch.zeros(length, dtype=torch.int64, device=device)
    seq[cu[1:-1].long()] = 1
    seq = seq.cumsum(0)
    idx = torch.arange(length, device=device)
    return ((seq[:, None] == seq[None, :]) & (idx[:, None] >= idx[None, :]))[None, None]


def _window(sliding_window, causal):
    if not sliding_window:
        return None
    left = int(sliding_window) - 1        # HF: kv_idx > q_idx - sliding_window
    return (left, 0) if causal else (left, left)


def _apply_sinks(out, lse, s_aux):
    """Attention sinks (gpt-oss): softmax over [scores, sink] with the sink column dropped is
    the sink-free output times Z / (Z + exp(sink)) = sigmoid(lse - sink)."""
    # out (B, H, Sq, D), lse (B, H, Sq), s_aux (H,)
    factor = torch.sigmoid(lse - s_aux.float().reshape(1, -1, 1))
    return (out.float() * factor.unsqueeze(-1)).to(out.dtype)


def fastattn_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                               scaling=None, is_causal=None, sliding_window=None, softcap=None,
                               s_aux=None, **kwargs):
    """transformers AttentionInterface entry backed by fastattn's kernels."""
    if kwargs.get("position_bias") is not None:
        raise ValueError("fastattn attention: position_bias (T5-style relative bias) is not "
                         "supported; use attn_implementation='sdpa' or 'eager' for this model")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal)
    dropout_p = float(dropout or 0.0)
    softcap = float(softcap or 0.0)
    if s_aux is not None and torch.is_grad_enabled() and (
            s_aux.requires_grad or query.requires_grad):
        raise NotImplementedError(
            "fastattn attention: attention sinks (s_aux) are supported for inference only "
            "(no gradient through the sink logits yet); train this model with "
            "attn_implementation='eager'")
    want_lse = s_aux is not None
    b, h, sq, d = query.shape
    sk = key.shape[2]

    packed = _packed_layout(query, key, attention_mask, kwargs)
    varlen = _varlen_fn()
    if packed is not None and varlen is not None and not want_lse:
        cu_q, cu_k, max_q, max_k = packed
        _log_route("varlen")
        q = query.transpose(1, 2).reshape(b * sq, h, d)             # (total, H, D)
        k = key.transpose(1, 2).reshape(b * sk, key.shape[1], d)
        v = value.transpose(1, 2).reshape(b * sk, value.shape[1], value.shape[-1])
        out = varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, scale=scaling,
                     is_causal=causal, window=_window(sliding_window, causal), softcap=softcap)
        return out.reshape(b, sq, h, -1), None

    mask = attention_mask
    if mask is None and packed is not None:
        mask = _block_causal_mask(packed[0], sq, query.device)     # varlen not available
    window = None
    alignment = "bottom_right"
    if mask is not None:
        route = "masked"
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
        is_causal_call = False                                     # the mask encodes it
    else:
        is_causal_call = causal and sq > 1
        window = _window(sliding_window, causal)
        route = "decode" if sq < sk else "dense"
        kvcache = _kvcache_fn()
        needs_grad = torch.is_grad_enabled() and (
            query.requires_grad or key.requires_grad or value.requires_grad)
        if route == "decode" and (sq == 1 or not causal) and kvcache is not None \
                and not needs_grad and dropout_p == 0.0:
            # transformers' cache already holds this step's keys: attend over all sk of them,
            # reading the (B, Hkv, Sk, D) tensors through a (B, Sk, Hkv, D) view (no copy)
            _log_route("decode")
            res = kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          cache_seqlens=sk, scale=scaling, is_causal=causal, window=window,
                          softcap=softcap, return_lse=want_lse)
            if not want_lse:
                return res, None
            out, lse = res                                  # (B, Sq, H, D), (B, H, Sq)
            return _apply_sinks(out.transpose(1, 2), lse, s_aux).transpose(1, 2), None
        if causal and sq > 1 and sk > sq:
            # transformers only drops the mask here when the cache was empty (a static cache's
            # unfilled tail follows the queries): top-left, as SDPA's is_causal
            key, value = key[:, :, :sq], value[:, :, :sq]
            route = "dense"
    _log_route(route)
    res = _functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal_call,
        scale=scaling, enable_gqa=True, window=window, softcap=softcap,
        causal_alignment=alignment, return_lse=want_lse)
    if want_lse:
        out, lse = res
        out = _apply_sinks(out, lse, s_aux)
    else:
        out = res
    return out.transpose(1, 2).contiguous(), None
