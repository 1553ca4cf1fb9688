"""The normalised attention probabilities P = exp(s - lse) as a custom op with autograd.

Serves `need_weights=True` of MultiHeadAttention from the fused attention's log-sum-exp: the
attention output comes from `fastattn::attention`, and this op writes P (B, H, Sq, Sk) in one
pass over the scores, without a softmax. Visibility follows docs/backend-contract.md; P is 0
on invisible keys and on rows whose lse is -inf (no visible key).

With `average=True` the op returns the mean over heads (B, Sq, Sk), what
need_weights=True with average_attn_weights=True returns; the C++ kernel then sums the heads in
fp32 tiles and never writes the per-head tensor.

Backends: `cpu` (fastattn._C's attention_weights_forward, csrc/cpu/attention_weights.cpp),
`triton` (kernels/attention_weights.py) and `torch` (a matmul and an exp in fp32); the latter
two average with a mean over heads afterwards. There is no CUDA C++ kernel: the `cuda` backend
runs the torch version and the dispatch log says "torch". The backward is the softmax
backward, written with torch ops; for `average=True` it recomputes the per-head P with torch
ops (only when a gradient reaches the weights, which training code rarely asks).
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _triton
from .._attention_weights_torch import (_raw_scores, _recompute_probs, _repeat_kv,  # noqa: F401
                                       head_mean, torch_attention_weights)
from .attention import _alignment


def attention_weights_impl(q: Tensor, k: Tensor, lse: Tensor, mask: Optional[Tensor],
                         key_lengths: Optional[Tensor], scale: float, causal: bool,
                         bottom_right: bool, window_left: int, window_right: int,
                         softcap: float, average: bool, backend: str) -> Tensor:
    """P (B, H, Sq, Sk), or its head mean (B, Sq, Sk) with `average`, in q's dtype;
    q (B, H, Sq, D), k (B, Hkv, Sk, D), lse (B, H, Sq)."""
    _backend.log_dispatch("attention_weights", backend)
    impl = _backend.backend_module(backend, "attention_weights")
    return impl.attention_weights_forward(
        q, k, lse, mask=mask, key_lengths=key_lengths, scale=scale, causal=causal,
        alignment=_alignment(bottom_right), window_left=window_left,
        window_right=window_right, softcap=softcap, average=average).contiguous()


attention_weights_op = torch.library.custom_op("fastattn::attention_weights",
                                               attention_weights_impl, mutates_args=())


@attention_weights_op.register_fake
def _(q, k, lse, mask, key_lengths, scale, causal, bottom_right, window_left, window_right,
      softcap, average, backend):
    b, h, sq, _ = q.shape
    return q.new_empty(b, sq, k.shape[2]) if average else q.new_empty(b, h, sq, k.shape[2])


def _setup_context(ctx, inputs, output):
    (q, k, lse, mask, key_lengths, scale, causal, bottom_right, window_left, window_right,
     softcap, average, backend) = inputs
    # The averaged op keeps no P: the backward recomputes it per head from q, k and lse.
    ctx.save_for_backward(q, k, lse, mask, key_lengths, None if average else output)
    ctx.args = (scale, causal, bottom_right, window_left, window_right, softcap)
    ctx.average = average
    ctx.mask_dtype = None if mask is None else mask.dtype


def _backward(ctx, dp):
    # Softmax backward: dS = P * (dP - rowsum(dP * P)); dq = dS k * scale, dk = dS^T q * scale.
    q, k, lse, mask, key_lengths, p = ctx.saved_tensors
    scale, causal, bottom_right, window_left, window_right, softcap = ctx.args
    if ctx.average:  # d(mean over heads) / dP_h = 1 / H for every head
        p = _recompute_probs(q, k, lse, mask, key_lengths, scale, causal, bottom_right,
                             window_left, window_right, softcap)
        dp = (dp / q.shape[1]).unsqueeze(1).expand(p.shape)
    acc = torch.promote_types(q.dtype, torch.float32)
    pf, dpf = p.to(acc), dp.to(acc)
    ds = pf * (dpf - (dpf * pf).sum(-1, keepdim=True))                    # (B, H, Sq, Sk)
    dmask = None
    if ctx.mask_dtype is not None and ctx.mask_dtype != torch.bool and ctx.needs_input_grad[3]:
        dmask = ds.to(ctx.mask_dtype)
    if softcap > 0:
        t = torch.tanh(_raw_scores(q, k, scale) / softcap)
        ds = ds * (1 - t * t)
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    kf = _repeat_kv(k, h).to(acc)
    dq = torch.matmul(ds, kf) * scale
    dk = (torch.matmul(ds.transpose(-2, -1), q.to(acc)) * scale)
    dk = dk.view(b, hkv, h // hkv, sk, d).sum(2)
    return (dq.to(q.dtype), dk.to(k.dtype), None, dmask, None, None, None, None, None, None,
            None, None, None)


torch.library.register_autograd("fastattn::attention_weights", _backward,
                                setup_context=_setup_context)
# torch.compile on the triton backend: the same body as a fastattn_triton op (ops/_triton.py)
_triton.register(attention_weights_op, attention_weights_impl, setup_context=_setup_context,
                 backward=_backward)


@torch.library.custom_op("fastattn::attention_dropout_keep", mutates_args=())
def dropout_keep_op(weights: Tensor, rng: Tensor, dropout_p: float, backend: str) -> Tensor:
    """The keep-mask (bool, weights' shape (B, H, Sq, Sk)) that `backend`'s attention drew
    for rng = (seed, offset): lets need_weights=True return the dropped probabilities."""
    keep_fn = getattr(_backend.backend_module(backend, "attention"), "dropout_keep_mask", None)
    if keep_fn is None:
        raise RuntimeError(f"backend {backend!r} cannot reproduce its attention dropout mask")
    seed, offset = (int(x) for x in rng.tolist())
    return keep_fn(weights.shape, dropout_p, seed, offset, weights.device)


@dropout_keep_op.register_fake
def _(weights, rng, dropout_p, backend):
    return torch.empty(weights.shape, dtype=torch.bool, device=weights.device)


def select_backend(device_type, dtype=None):
    """Backend of the weights op: the one selector (fastattn._backend.select), which falls back
    to the torch version instead of refusing (the weights are a by-product of the attention
    call; the `cuda` backend has no weights kernel). The op's body logs what runs."""
    return _backend.select("attention_weights", device_type, fallback_to_torch=True,
                           dtype=dtype, device=device_type)


def attention_weights(q, k, lse, *, mask=None, key_lengths=None, scale, causal=False,
                      alignment="top_left", window_left=-1, window_right=-1, softcap=0.0,
                      average=False, backend=None):
    """Attention probabilities exp(s - lse) (B, H, Sq, Sk) for the lse of fastattn attention,
    or their mean over heads (B, Sq, Sk) with average=True.

    Arguments as the attention contract (mask expanded to (B, H, Sq, Sk), bool True = may
    attend, or float added). Differentiable w.r.t. q, k (and a float mask).
    """
    if alignment not in ("top_left", "bottom_right"):
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    if backend is None:
        backend = select_backend(q.device.type, q.dtype)
    return _backend.eager_call(attention_weights_op, attention_weights_impl, backend,
                               q, k, lse, mask, key_lengths, float(scale), bool(causal),
                               alignment == "bottom_right", int(window_left),
                               int(window_right), float(softcap), bool(average), backend)
