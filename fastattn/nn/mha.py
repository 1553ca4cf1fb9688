"""MultiHeadAttention: nn.MultiheadAttention on fastattn's fused attention kernels."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as TF

from .. import _checks
from ..ops import attention as _attention_ops
from ..ops.attention_weights import attention_weights, dropout_keep_op, head_mean
from . import _masks
from .rotary import RotaryEmbedding


class MultiHeadAttention(nn.MultiheadAttention):
    """Drop-in replacement for torch.nn.MultiheadAttention on fused attention kernels.

    Same constructor, attributes, parameter names, initialisation and state_dict as PyTorch's
    (it subclasses it); forward takes and returns what PyTorch's does. Every case runs on the
    fused attention op (training and dropout included); need_weights=True reads the
    probabilities off the kernel's log-sum-exp in one more pass (fastattn::attention_weights:
    a C++ kernel on the cpu backend, which also averages the heads in its tiles, a Triton
    kernel on the triton backend, a GEMM + exp in torch ops otherwise) instead of
    materialising a softmax in the autograd graph.

    Differences from PyTorch, by design:
    - A query whose keys are all masked gets attention output 0 (before out_proj, so the
      output row equals out_proj.bias) and weights 0; PyTorch returns NaN there.
    - is_causal=True is trusted as PyTorch documents it (attn_mask is the top-left causal
      mask, so its contents are not read); it still requires attn_mask. As in PyTorch, keys
      appended by add_bias_kv / add_zero_attn are then hidden by the causal rule when
      need_weights=False and there is no key_padding_mask (PyTorch's SDPA path), and visible
      to every query otherwise (its mask path).
    - Dropout draws its mask from the attention kernels' counter-based RNG, not from
      torch's dropout, so the dropped positions differ from PyTorch's for a given seed.

    Keyword-only extensions (off by default, so the drop-in contract holds):
      rotary: True (rotate all head features, NeoX style) or a fastattn.RotaryEmbedding,
        applied to the projected q and k (positions 0.. of each sequence).
      num_kv_heads: grouped-query attention; k/v projections produce num_kv_heads heads
        (in_proj_weight is then (embed_dim + 2 * num_kv_heads * head_dim, embed_dim)).
      window: sliding window, an int or (left, right) in keys (-1 = unbounded).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, rotary=False, num_kv_heads=None, window=None):
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(kv_heads, int) or kv_heads <= 0 or num_heads % kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads!r}) must be a positive divisor of "
                             f"num_heads ({num_heads})")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias,
                         add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim,
                         vdim=vdim, batch_first=batch_first, device=device, dtype=dtype)
        self.num_kv_heads = kv_heads
        if kv_heads != num_heads:
            self._make_gqa_parameters(bias, add_bias_kv, device, dtype)
        self.window = None if window is None else _checks.window_pair(window)
        if rotary is True:
            rotary = RotaryEmbedding(self.head_dim, device=device)
        elif rotary is False or rotary is None:
            rotary = None
        elif not isinstance(rotary, RotaryEmbedding):
            raise ValueError(f"rotary must be a bool or a fastattn.RotaryEmbedding, got "
                             f"{type(rotary).__name__}")
        elif rotary.dim > self.head_dim:
            raise ValueError(f"rotary.dim ({rotary.dim}) exceeds head_dim ({self.head_dim})")
        self.rotary = rotary

    def _make_gqa_parameters(self, bias, add_bias_kv, device, dtype):
        """Smaller k/v projections for grouped-query attention, initialised like PyTorch's."""
        kw = dict(device=device, dtype=dtype)
        e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(e + 2 * kv, e, **kw))
        else:
            self.k_proj_weight = nn.Parameter(torch.empty(kv, self.kdim, **kw))
            self.v_proj_weight = nn.Parameter(torch.empty(kv, self.vdim, **kw))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(e + 2 * kv, **kw))
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, kv, **kw))
            self.bias_v = nn.Parameter(torch.empty(1, 1, kv, **kw))
        self._reset_parameters()

    def extra_repr(self):
        extras = []
        if self.num_kv_heads != self.num_heads:
            extras.append(f"num_kv_heads={self.num_kv_heads}")
        if self.window is not None:
            extras.append(f"window={self.window}")
        return ", ".join(extras)

    # ------------------------------------------------------------------ input checks

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (L, E) or 3-D (batched), got shape "
                             f"{tuple(query.shape)}")
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(f"{name} must have {query.dim()} dims like query, got shape "
                                 f"{tuple(t.shape)}")
        for name, t, size in (("query", query, self.embed_dim), ("key", key, self.kdim),
                              ("value", value, self.vdim)):
            if t.shape[-1] != size:
                raise ValueError(f"{name} must have feature size {size} (last dim), got shape "
                                 f"{tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have "
                             f"the same sequence and batch sizes")
        batched = query.dim() == 3
        if batched:
            bdim = 0 if self.batch_first else 1
            if key.shape[bdim] != query.shape[bdim]:
                raise ValueError(f"key batch size {key.shape[bdim]} must equal query's "
                                 f"{query.shape[bdim]} (batch_first={self.batch_first})")
        if key_padding_mask is not None:
            _masks.check_mask_dtype("key_padding_mask", key_padding_mask)
            if key_padding_mask.dim() != (2 if batched else 1):
                raise ValueError(f"key_padding_mask must be {'2-D (N, S)' if batched else '1-D (S,)'}"
                                 f" for {'batched' if batched else 'unbatched'} query, got "
                                 f"shape {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            _masks.check_mask_dtype("attn_mask", attn_mask)
            if attn_mask.dim() not in (2, 3):
                raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (N*num_heads, L, S), got "
                                 f"shape {tuple(attn_mask.shape)}")
        return batched

    @staticmethod
    def _check_mask_shapes(key_padding_mask, attn_mask, n, h, q_len, k_len):
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (n, k_len):
            raise ValueError(f"key_padding_mask must have shape {(n, k_len)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            want = (q_len, k_len) if attn_mask.dim() == 2 else (n * h, q_len, k_len)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"attn_mask must have shape {want}, got "
                                 f"{tuple(attn_mask.shape)}")

    # ------------------------------------------------------------------ projections

    def _to_heads(self, t, heads, batch_first):
        """(N, L, heads*D) or (L, N, heads*D), any strides -> (N, heads, L, D) view."""
        t = t.unflatten(-1, (heads, self.head_dim))
        return t.permute(0, 2, 1, 3) if batch_first else t.permute(1, 2, 0, 3)

    def _project(self, query, key, value, batch_first):
        """q (N, H, L, D), k and v (N, Hkv, S, D): strided views of the projections.

        Self-attention runs one GEMM for q, k and v (as PyTorch's packed projection)."""
        e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:e + kv], b[e + kv:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:
                # split (not slicing): its backward is one cat into the (.., 3E) gradient
                qkv = TF.linear(query, w, b)                     # (.., .., E + 2 kv)
                q, k, v = qkv.split([e, kv, kv], dim=-1)
            elif key is value:
                q = TF.linear(query, w[:e], bq)
                kvp = TF.linear(key, w[e:], None if b is None else b[e:])
                k, v = kvp.split([kv, kv], dim=-1)
            else:
                q = TF.linear(query, w[:e], bq)
                k = TF.linear(key, w[e:e + kv], bk)
                v = TF.linear(value, w[e + kv:], bv)
        else:
            q = TF.linear(query, self.q_proj_weight, bq)
            k = TF.linear(key, self.k_proj_weight, bk)
            v = TF.linear(value, self.v_proj_weight, bv)
        return (self._to_heads(q, self.num_heads, batch_first),
                self._to_heads(k, self.num_kv_heads, batch_first),
                self._to_heads(v, self.num_kv_heads, batch_first))

    def _append_keys(self, k, v):
        """bias_k/bias_v and the zero key of add_zero_attn, appended after the S keys."""
        n, hkv, _, d = k.shape
        extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, hkv, 1, d).expand(n, -1, -1, -1)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, hkv, 1, d).expand(n, -1, -1, -1)], dim=2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, hkv, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(n, hkv, 1, d)], dim=2)
            extra += 1
        return k, v, extra

    # ------------------------------------------------------------------ forward

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        """Same arguments and results as torch.nn.MultiheadAttention.forward.

        query (L, N, E), or (N, L, E) with batch_first, or unbatched (L, E); key/value likewise
        with S and kdim/vdim. key_padding_mask (N, S) / (S,), attn_mask (L, S) or
        (N*num_heads, L, S): bool True = masked out, or float added to the scores.
        is_causal: hint that attn_mask is the causal mask (attn_mask is required).
        Returns (attn_output, attn_weights or None); weights are (N, L, S) averaged over heads
        or (N, num_heads, L, S), without the batch dim for unbatched input. Fully masked
        queries give output out_proj(0) and weights 0 (PyTorch gives NaN).
        """
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True needs attn_mask (is_causal is a hint that "
                               "attn_mask is the causal mask, as in PyTorch); pass attn_mask, "
                               "e.g. nn.Transformer.generate_square_subsequent_mask(L)")
        batch_first = self.batch_first or not batched
        if not batched:
            # keep `is` relations (self-attention uses one GEMM)
            uq = query.unsqueeze(0)
            uk = uq if key is query else key.unsqueeze(0)
            uv = uk if value is key else (uq if value is query else value.unsqueeze(0))
            query, key, value = uq, uk, uv
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        n = query.shape[0] if batch_first else query.shape[1]
        q_len = query.shape[1] if batch_first else query.shape[0]
        k_len = key.shape[1] if batch_first else key.shape[0]
        self._check_mask_shapes(key_padding_mask, attn_mask, n, self.num_heads, q_len, k_len)

        q, k, v = self._project(query, key, value, batch_first)
        if self.rotary is not None:
            q, k = self.rotary(q, k, seq_dim=2)
        k, v, n_extra = self._append_keys(k, v)
        mask, key_lengths, causal = _masks.prepare(
            attn_mask, key_padding_mask, is_causal, batch=n, heads=self.num_heads,
            q_len=q_len, k_len=k_len, n_extra=n_extra, dtype=q.dtype, device=q.device,
            need_weights=need_weights)
        dropout_p = float(self.dropout) if self.training else 0.0
        out, lse, backend, rng = self._attend(q, k, v, mask, key_lengths, causal, dropout_p)

        e = self.embed_dim
        out = (out.transpose(1, 2).reshape(n, q_len, e) if batch_first
               else out.permute(2, 0, 1, 3).reshape(q_len, n, e))
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        if not need_weights:
            return out, None
        weights = self._weights(q, k, lse, mask, key_lengths, causal, dropout_p, backend, rng,
                                average_attn_weights)
        return out, (weights if batched else weights.squeeze(0))

    def _attend(self, q, k, v, mask, key_lengths, causal, dropout_p):
        """The fused attention (the functional API's entry): out (N, H, L, D), lse (N, H, L),
        backend, rng."""
        n, h, q_len, d = q.shape
        if mask is not None:
            mask = mask.expand(n, h, q_len, k.shape[2])
        wl, wr = self.window if self.window is not None else (-1, -1)
        return _attention_ops.attend(q, k, v, mask=mask, key_lengths=key_lengths,
                                     scale=1.0 / math.sqrt(d), causal=causal, window_left=wl,
                                     window_right=wr, dropout_p=dropout_p)

    def _weights(self, q, k, lse, mask, key_lengths, causal, dropout_p, backend, rng, average):
        """(N, H, L, S') probabilities from the lse, or their head mean (N, L, S') with
        `average`; with dropout, the kernel's dropped ones (averaged after dropping)."""
        n, h, q_len, d = q.shape
        if mask is not None:
            mask = mask.expand(n, h, q_len, k.shape[2])
        wl, wr = self.window if self.window is not None else (-1, -1)
        # Without dropout the weights op averages in its kernel (no per-head tensor).
        fused_mean = average and dropout_p == 0
        w = attention_weights(q, k, lse, mask=mask, key_lengths=key_lengths,
                              scale=1.0 / math.sqrt(d), causal=causal, window_left=wl,
                              window_right=wr, average=fused_mean)
        if dropout_p > 0:
            keep = dropout_keep_op(w.detach(), rng, dropout_p, backend)
            w = w * keep.to(w.dtype) / (1.0 - dropout_p)
        return head_mean(w) if average and not fused_mean else w
