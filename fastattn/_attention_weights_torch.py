"""The torch backend of the attention-weights op (fp32 math), and the helpers its backward
shares: P = exp(s - lse) written with torch ops."""

import torch

from . import reference
from .ops.attention import _alignment


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


def attention_weights_forward(q, k, lse, *, mask, key_lengths, scale, causal, alignment,
                              window_left, window_right, softcap, average):
    """The backend contract of fastattn::attention_weights (fastattn/_torch_backend.py)."""
    p = torch_attention_weights(q, k, lse, mask, key_lengths, scale, causal,
                                alignment == "bottom_right", window_left, window_right, softcap)
    return head_mean(p) if average else p
