"""Attention with explicit log-sum-exp statistics: the low-level API for composing attention
over key blocks (ring / context-parallel attention, chunked prefill, custom schedules).

    out_i, lse_i = attention_forward_with_lse(q, k_i, v_i, ...)        # one key block each
    out, lse = merge_attention_states(out_1, lse_1, out_2, lse_2)       # = attention over both
    dq_i, dk_i, dv_i = attention_backward_with_lse(dout, q, k_i, v_i, out, lse, ...)
    # dq = sum_i dq_i; dk_i/dv_i are the gradients of block i's keys and values

The backward takes the caller's (out, lse): given the *merged* statistics of all key blocks it
returns the gradient of the full attention restricted to block i's keys, because the softmax
probabilities of block i are exp(s - lse) with the global lse and the row term
sum(dout * out) uses the global out. None of these functions records autograd history.
"""

import math

import torch

from . import _backend, _checks
from .functional import ATTENTION_DTYPES
from .ops import attention as _attention_ops
from .ops import merge_attention_states as _merge_ops


def _validate_qkv(q, k, v, causal_alignment, softcap):
    _checks.check_tensor("q", q, ndim=4, dtypes=ATTENTION_DTYPES)
    _checks.check_tensor("k", k, ndim=4, dtypes=ATTENTION_DTYPES)
    _checks.check_tensor("v", v, ndim=4, dtypes=ATTENTION_DTYPES)
    _checks.check_same("k", k, "q", q)
    _checks.check_same("v", v, "q", q)
    b, h, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"k/v batch size ({k.shape[0]}, {v.shape[0]}) must match q's ({b})")
    if k.shape[-1] != d:
        raise ValueError(f"k head dim {k.shape[-1]} must equal q head dim {d}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v shape {tuple(v.shape)} must match k's heads and length "
                         f"{tuple(k.shape[1:3])}")
    if k.shape[1] == 0 or h % k.shape[1] != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({k.shape[1]})")
    if causal_alignment not in _attention_ops.ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {_attention_ops.ALIGNMENTS}, "
                         f"got {causal_alignment!r}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")


def attention_forward_with_lse(q, k, v, *, scale=None, is_causal=False,
                               causal_alignment="top_left", window=None, softcap=0.0):
    """Attention forward that also returns the log-sum-exp of each query row.

    q (B, H, Sq, D); k, v (B, Hkv, Sk, D) with H % Hkv == 0 (GQA without repeating K/V).
    scale (default 1/sqrt(D)), is_causal, causal_alignment ("top_left" or "bottom_right"),
    window ((left, right) in keys, -1 = unbounded, or an int for both) and softcap mean what
    they mean in fastattn.scaled_dot_product_attention. Returns out (B, H, Sq, D) in q's dtype
    and lse (B, H, Sq) fp32 (-inf for a row with no visible key, whose out is 0).
    """
    _validate_qkv(q, k, v, causal_alignment, softcap)
    window = _checks.window_pair(window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse, _, _ = _attention_ops.attend(
        q.detach(), k.detach(), v.detach(), scale=scale, causal=bool(is_causal),
        bottom_right=causal_alignment == "bottom_right", window_left=window[0],
        window_right=window[1], softcap=float(softcap))
    return out, lse


def attention_backward_with_lse(dout, q, k, v, out, lse, *, scale=None, is_causal=False,
                                causal_alignment="top_left", window=None, softcap=0.0,
                                deterministic=False):
    """Gradients (dq, dk, dv) of attention given the caller's statistics (out, lse).

    dout, out (B, H, Sq, D) in q's dtype; lse (B, H, Sq) fp32. With the (out, lse) that
    attention_forward_with_lse returned for these same keys this is the ordinary attention
    backward; with the merged (out, lse) of several key blocks it is that attention's gradient
    restricted to this block's keys (dq is this block's share: sum it over blocks). Rows with
    lse = -inf get zero gradients. Keywords as in attention_forward_with_lse; deterministic
    asks for a bitwise-reproducible backward.
    """
    _validate_qkv(q, k, v, causal_alignment, softcap)
    b, h, sq, _ = q.shape
    out_shape = (b, h, sq, v.shape[-1])
    for name, t in (("dout", dout), ("out", out)):
        _checks.check_tensor(name, t, ndim=4, dtypes=ATTENTION_DTYPES)
        _checks.check_same(name, t, "q", q)
        if tuple(t.shape) != out_shape:
            raise ValueError(f"{name} must have shape {out_shape}, got {tuple(t.shape)}")
    _checks.check_tensor("lse", lse, ndim=3, dtypes=(torch.float32,))
    _checks.check_same("lse", lse, "q", q, dtype=False)
    if tuple(lse.shape) != (b, h, sq):
        raise ValueError(f"lse must have shape {(b, h, sq)}, got {tuple(lse.shape)}")
    window = _checks.window_pair(window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = _attention_ops.select_backend(
        q, k, v, causal=bool(is_causal), bottom_right=causal_alignment == "bottom_right",
        window_left=window[0], window_right=window[1], softcap=float(softcap),
        deterministic=bool(deterministic))
    with torch.no_grad():          # (the backward op's triton twin under torch.compile)
        dq, dk, dv, _ = _backend.eager_call(
            _attention_ops.attention_backward_op, _attention_ops.attention_backward_impl,
            backend, dout.detach().contiguous(), q.detach(), k.detach(), v.detach(),
            out.detach(), lse.detach(), None, None, None, scale, bool(is_causal),
            causal_alignment == "bottom_right", window[0], window[1], float(softcap), 0.0,
            bool(deterministic), False, backend)
    return dq, dk, dv


MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Merge the attention results of the same queries over two disjoint key sets.

    out_a, out_b (..., D) (typically (B, H, S, D)) of one floating dtype; lse_a, lse_b (...)
    fp32. Returns (out, lse) equal to attention over the union of the keys:
    lse = log(exp(lse_a) + exp(lse_b)), out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b,
    computed in fp32; out in out_a's dtype. A row where one side is -inf takes the other side;
    where both are, out = 0 and lse = -inf (never NaN). Differentiable in all four inputs.
    """
    _checks.check_tensor("out_a", out_a, dtypes=MERGE_DTYPES)
    _checks.check_tensor("out_b", out_b, dtypes=MERGE_DTYPES)
    _checks.check_same("out_b", out_b, "out_a", out_a)
    if out_a.dim() < 1:
        raise ValueError("out_a must have at least 1 dimension (the head dim), got a scalar")
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b shape {tuple(out_b.shape)} must equal out_a's "
                         f"{tuple(out_a.shape)}")
    # fp32 statistics (attention's lse); an fp64 merge may also carry fp64 ones
    lse_dtypes = ((torch.float32, torch.float64) if out_a.dtype == torch.float64
                  else (torch.float32,))
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        _checks.check_tensor(name, t, dtypes=lse_dtypes)
        _checks.check_same(name, t, "out_a", out_a, dtype=False)
        if t.shape != out_a.shape[:-1]:
            raise ValueError(f"{name} must have shape {tuple(out_a.shape[:-1])} (out_a's without "
                             f"the head dim), got {tuple(t.shape)}")
    backend = _backend.select("merge_attention_states", out_a.device.type, dtype=out_a.dtype,
                              device=out_a.device.type, head_dim=out_a.shape[-1])
    return _backend.eager_call(_merge_ops.merge_op, _merge_ops.merge_impl, backend,
                               out_a, lse_a, out_b, lse_b, backend)
