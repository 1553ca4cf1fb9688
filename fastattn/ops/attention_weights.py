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

from .. import _backend, reference


def _alignment(bottom_right):
    return "bottom_right" if bottom_right else "top_left"


def _repeat_kv(k, heads):
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


def _raw_scores(q, k, scale):
    """fp32 (B, H, Sq, Sk) q k^T * scale (fp64 stays fp64)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    kf = _repeat_kv(k, q.shape[1]).to(acc)
    return torch.matmul(q.to(acc), kf.transpose(-2, -1)).mul_(scale)


def _visible(q, k, mask, key_lengths, causal, bottom_right, window_left, window_right):
    """Bool visibility broadcastable to (B, H, Sq, Sk), or None when every key is visible."""
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    vis = None
    if causal or window_left >= 0 or window_right >= 0:
        vis = reference.attention_visibility(sq, sk, causal=causal,
                                             alignment=_alignment(bottom_right),
                                             window_left=window_left, window_right=window_right,
                                             device=q.device)                    # (Sq, Sk)
    if key_lengths is not None:
        keys = torch.arange(sk, device=q.device).view(1, 1, 1, sk)
        kl = keys < key_lengths.to(q.device).view(b, 1, 1, 1)                    # (B, 1, 1, Sk)
        vis = kl if vis is None else vis & kl
    if mask is not None and mask.dtype == torch.bool:
        vis = mask if vis is None else vis & mask
    return vis


def head_mean(w):
    """w (N, H, L, S) -> mean over heads (N, L, S). In fp32/fp64 as a GEMM with a 1/H row:
    several times faster on CPU than mean(dim=1), which reduces over a strided dim."""
    if w.dtype not in (torch.float32, torch.float64):
        return w.mean(dim=1)
    n, h = w.shape[:2]
    return torch.matmul(w.new_full((1, h), 1.0 / h), w.reshape(n, h, -1)).view(n, *w.shape[2:])


def _grouped_scores_into(out, q, k, scale):
    """out (B, H, Sq, Sk) += q k^T * scale, one batched GEMM per kv head group (no K repeat)."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    qg = q.to(out.dtype).reshape(b * hkv, (h // hkv) * sq, d)
    kg = k.to(out.dtype).reshape(b * hkv, sk, d)
    out.view(b * hkv, (h // hkv) * sq, sk).baddbmm_(qg, kg.transpose(1, 2), alpha=scale)
    return out


def torch_attention_weights(q, k, lse, mask, key_lengths, scale, causal, bottom_right,
                            window_left, window_right, softcap):
    """The torch backend of the op (fp32 math, result in q's dtype).

    Three passes over (B, H, Sq, Sk): write -lse (+ float mask, -inf where invisible), add
    q k^T * scale in the GEMM (beta = 1), exp in place. Empty rows get -inf, so P = 0.
    """
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    lse_ = lse.to(acc)
    bias = torch.where(torch.isneginf(lse_), float("-inf"), -lse_).unsqueeze(-1)  # (B,H,Sq,1)
    if mask is not None and mask.dtype != torch.bool:
        bias = bias + mask.to(acc)
    vis = _visible(q, k, mask, key_lengths, causal, bottom_right, window_left, window_right)
    if vis is not None:
        # an additive 0 / -inf term of vis's (usually small) shape; the add writes the one
        # full-size buffer that the GEMM and exp then reuse
        hide = torch.zeros(vis.shape, dtype=acc, device=q.device).masked_fill_(~vis,
                                                                              float("-inf"))
        bias = bias + hide
    if softcap > 0:
        s = _raw_scores(q, k, scale)
        s = torch.tanh(s.div_(softcap)).mul_(softcap)
        return s.add_(bias).exp_().to(q.dtype)
    out = bias.expand(b, h, sq, sk).contiguous()
    return _grouped_scores_into(out, q, k, scale).exp_().to(q.dtype)


def _recompute_probs(q, k, lse, mask, key_lengths, scale, causal, bottom_right, window_left,
                     window_right, softcap):
    """P (B, H, Sq, Sk) in fp32 for the backward of the averaged op: the torch version's math
    without its in-place passes (which AOT autograd's backward tracing does not take)."""
    s = _raw_scores(q, k, scale)
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(s.dtype)
    lse_ = lse.to(s.dtype)
    s = s - torch.where(torch.isneginf(lse_), float("inf"), lse_).unsqueeze(-1)  # empty rows: 0
    vis = _visible(q, k, mask, key_lengths, causal, bottom_right, window_left, window_right)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    return torch.exp(s)


@torch.library.custom_op("fastattn::attention_weights", mutates_args=())
def attention_weights_op(q: Tensor, k: Tensor, lse: Tensor, mask: Optional[Tensor],
                         key_lengths: Optional[Tensor], scale: float, causal: bool,
                         bottom_right: bool, window_left: int, window_right: int,
                         softcap: float, average: bool, backend: str) -> Tensor:
    """P (B, H, Sq, Sk), or its head mean (B, Sq, Sk) with `average`, in q's dtype;
    q (B, H, Sq, D), k (B, Hkv, Sk, D), lse (B, H, Sq)."""
    _backend.log_dispatch("attention_weights", backend)
    if backend == "cpu":
        return torch.ops.fastattn.attention_weights_forward(
            q, k, lse, mask, scale, causal, bottom_right, window_left, window_right, softcap,
            key_lengths, average)
    if backend == "triton":
        from ..kernels.attention_weights import attention_weights_forward
        p = attention_weights_forward(
            q, k, lse, mask=mask, key_lengths=key_lengths, scale=scale, causal=causal,
            alignment=_alignment(bottom_right), window_left=window_left,
            window_right=window_right, softcap=softcap)
    else:
        p = torch_attention_weights(q, k, lse, mask, key_lengths, scale, causal, bottom_right,
                                    window_left, window_right, softcap)
    return head_mean(p) if average else p


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
    """Backend of the weights op for the requested fastattn backend (the op's body logs the
    dispatch when it runs).

    cpu (the C++ kernel) when asked for, or auto on CPU where it is built; triton when asked
    for, or auto on CUDA; otherwise the torch version, labelled "torch" (the `cuda` backend
    has no weights kernel). Under torch.compile a trace-time constant guarded on use_backend()
    (as fastattn._backend.select).
    """
    if torch.compiler.is_compiling():
        return _select_at_trace_time(device_type, dtype, _backend.use_backend_override())
    return _select(device_type, dtype, None)


def _select(device_type, dtype, override):
    requested = _backend.requested_backend() if override is None else override
    name = "torch"
    if requested == "triton" or (requested == "auto" and device_type == "cuda"):
        reason = _backend.unavailable_reason("triton", device_type)
        if reason is None:
            name = "triton"
        elif requested == "triton":
            raise RuntimeError(f"fastattn backend 'triton' cannot run attention_weights on "
                               f"{device_type} tensors: {reason}")
    elif requested in ("cpu", "auto") and device_type == "cpu":
        from .. import _C_ops
        reason = _C_ops.unsupported("attention_weights", dtype=dtype, device=device_type)
        if reason is None:
            name = "cpu"
        elif requested == "cpu":
            raise RuntimeError(f"fastattn backend 'cpu' cannot run attention_weights: {reason}")
    return name


_select_at_trace_time = torch.compiler.assume_constant_result(_select)


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
    return attention_weights_op(q, k, lse, mask, key_lengths, float(scale), bool(causal),
                                alignment == "bottom_right", int(window_left),
                                int(window_right), float(softcap), bool(average), backend)
