"""The `torch` backend: the contract functions of docs/backend-contract.md on reference.py.

Forward passes run the reference under no_grad; backward passes recompute the reference with
autograd. It runs anywhere and supports every case, so it is the last fallback of `auto`.
Its attention materialises (B, H, Sq, Sk) scores: correct, not fast.
"""

import torch

from . import reference


def unsupported(op, **case):
    return None


# ------------------------------------------------------------------ attention

def dropout_keep_mask(shape, dropout_p, seed, offset, device):
    """Bool keep-mask of `shape`, a pure function of (seed, offset) so the backward can
    regenerate it."""
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + int(offset)) % (2**63 - 1))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _reference_attention(q, k, v, mask, scale, causal, alignment, window_left, window_right,
                         softcap, key_lengths, dropout_p, seed, offset, return_lse,
                         alibi_slopes=None):
    keep = None
    if dropout_p > 0:
        b, h, sq, _ = q.shape
        keep = dropout_keep_mask((b, h, sq, k.shape[2]), dropout_p, seed, offset, q.device)
    return reference.attention(q, k, v, mask=mask, scale=scale, causal=causal,
                               alignment=alignment, window_left=window_left,
                               window_right=window_right, softcap=softcap,
                               key_lengths=key_lengths, dropout_mask=keep,
                               dropout_p=dropout_p, return_lse=return_lse,
                               alibi_slopes=alibi_slopes)


def attention_forward(q, k, v, *, mask, scale, causal, alignment, window_left, window_right,
                      softcap, key_lengths, dropout_p, seed, offset, alibi_slopes=None):
    # Computed in fp32 (fp64 stays fp64) and rounded once at the end, as the kernels do
    # (contract: accumulate in fp32). In the input dtype, fp16/bf16 scores and probabilities
    # are rounded before the softmax, and the backward (fp32, from this lse) then differs from
    # the forward's own P by more than the kernels' 2x-rule error.
    acc = torch.promote_types(q.dtype, torch.float32)
    m = mask.to(acc) if mask is not None and mask.is_floating_point() else mask
    with torch.no_grad():
        out, lse = _reference_attention(q.to(acc), k.to(acc), v.to(acc), m, scale, causal,
                                        alignment, window_left, window_right, softcap,
                                        key_lengths, dropout_p, seed, offset, return_lse=True,
                                        alibi_slopes=alibi_slopes)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def attention_backward(dout, q, k, v, out, lse, *, mask, scale, causal, alignment, window_left,
                       window_right, softcap, key_lengths, dropout_p, seed, offset,
                       deterministic, mask_needs_grad, _keep=None, alibi_slopes=None):
    # _keep: the dropout keep-mask to use instead of regenerating it (varlen_backward).
    # Explicit FlashAttention backward math on materialised scores (custom-op bodies run below
    # autograd, so the reference cannot be differentiated here).
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = h // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    raw = torch.matmul(qf, kf.transpose(-2, -1)) * scale                 # (B, H, Sq, Sk)
    capped = softcap * torch.tanh(raw / softcap) if softcap > 0 else raw
    scores = capped if mask is None or mask.dtype == torch.bool else capped + mask.to(acc)
    if alibi_slopes is not None:                       # a constant: no gradient of its own
        shift = sk - sq if alignment == "bottom_right" else 0
        scores = scores + reference.alibi_bias(alibi_slopes, sq, sk, shift, acc)
    visible = reference.attention_visibility(sq, sk, causal=causal, alignment=alignment,
                                             window_left=window_left, window_right=window_right,
                                             device=q.device).expand(b, h, sq, sk)
    if key_lengths is not None:
        keys = torch.arange(sk, device=q.device).view(1, 1, 1, sk)
        visible = visible & (keys < key_lengths.view(b, 1, 1, 1))
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    lse_ = lse.to(acc).unsqueeze(-1)
    finite = torch.isfinite(lse_)
    probs = torch.where(visible & finite, torch.exp(scores - torch.where(finite, lse_, 0)), 0)
    do = dout.to(acc)
    dp = torch.matmul(do, vf.transpose(-2, -1))                            # (B, H, Sq, Sk)
    p_used = probs
    if dropout_p > 0:
        keep = _keep if _keep is not None else dropout_keep_mask((b, h, sq, sk), dropout_p,
                                                                  seed, offset, q.device)
        p_used = probs * keep / (1.0 - dropout_p)
        dp = dp * keep / (1.0 - dropout_p)
    # delta = rowsum(dO * O). Where lse is this block's own (its P sums to 1), take it from the
    # fp32 P instead of the stored O: O's rounding then does not leak into dS, and a one-hot row
    # gives dS = 1 * (dP - dP) = 0 exactly (dO . O summed in another order left ~1e-7 that
    # scale = 1e10 turned into gradients of 1e4). Where `out`/`lse` are the merged statistics of
    # several key blocks (attention_backward_with_lse, ring attention), this block's P sums to
    # less than 1 and only the caller's O gives the full delta.
    delta_from_p = (probs * dp).sum(-1, keepdim=True)
    delta_from_out = (do * out.to(acc)).sum(-1, keepdim=True)
    own_stats = (probs.sum(-1, keepdim=True) - 1).abs() <= 1e-6
    delta = torch.where(own_stats, delta_from_p, delta_from_out)
    ds = probs * (dp - delta)                                              # dL/dscores
    ds_raw = ds * (1 - torch.tanh(raw / softcap) ** 2) if softcap > 0 else ds
    dq = torch.matmul(ds_raw, kf) * scale
    dk = (torch.matmul(ds_raw.transpose(-2, -1), qf) * scale).view(b, hkv, group, sk, d).sum(2)
    dv = torch.matmul(p_used.transpose(-2, -1), do).view(b, hkv, group, sk, -1).sum(2)
    dmask = ds.float() if mask_needs_grad else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


# ------------------------------------------------------------------ varlen attention

def varlen_dropout_keep_mask(batch, heads, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset,
                             device):
    """Keep-mask (B, H, max_q, max_k); sequence b uses [b, :, :len_q, :len_k]."""
    return dropout_keep_mask((batch, heads, max_seqlen_q, max_seqlen_k), dropout_p, seed, offset,
                             device)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale,
                   causal, window_left, window_right, softcap, dropout_p, seed, offset,
                   alibi_slopes=None):
    keep = None
    if dropout_p > 0:
        keep = varlen_dropout_keep_mask(cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q,
                                        max_seqlen_k, dropout_p, seed, offset, q.device)
    # Computed in fp32 at least (the contract's accumulation), like varlen_backward's math:
    # an fp16 forward's rounded logits would not match the lse the backward recomputes P from.
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        out, lse = reference.varlen_attention(
            q.to(acc), k.to(acc), v.to(acc), cu_seqlens_q, cu_seqlens_k, scale=scale,
            causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
            dropout_mask=keep, dropout_p=dropout_p, return_lse=True, alibi_slopes=alibi_slopes)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, *, scale, causal, window_left, window_right, softcap, dropout_p,
                    seed, offset, deterministic, alibi_slopes=None):
    """Per-sequence loop over attention_backward (bottom-right): (dq, dk, dv)."""
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    keep = None
    if dropout_p > 0:
        keep = varlen_dropout_keep_mask(len(cu_q) - 1, q.shape[1], max_seqlen_q, max_seqlen_k,
                                        dropout_p, seed, offset, q.device)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b in range(len(cu_q) - 1):
        qa, qe, ka, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if qe == qa or ke == ka:
            continue                                   # no visible key: all gradients 0
        seq = lambda t, a, e: t[a:e].transpose(0, 1).unsqueeze(0)       # (1, H, S_b, D)
        g = attention_backward(
            seq(dout, qa, qe), seq(q, qa, qe), seq(k, ka, ke), seq(v, ka, ke), seq(out, qa, qe),
            lse[:, qa:qe].unsqueeze(0), mask=None, scale=scale, causal=causal,
            alignment="bottom_right", window_left=window_left, window_right=window_right,
            softcap=softcap, key_lengths=None, dropout_p=dropout_p, seed=seed, offset=offset,
            deterministic=deterministic, mask_needs_grad=False,
            _keep=None if keep is None else keep[b:b + 1, :, :qe - qa, :ke - ka],
            alibi_slopes=None if alibi_slopes is None else alibi_slopes[b:b + 1])
        dq[qa:qe] = g[0][0].transpose(0, 1)
        dk[ka:ke] = g[1][0].transpose(0, 1)
        dv[ka:ke] = g[2][0].transpose(0, 1)
    return dq, dk, dv

# ------------------------------------------------------------------ merge_attention_states

def merge_attention_states(out_a, lse_a, out_b, lse_b):
    out, lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    return out.contiguous(), lse.contiguous()


# ------------------------------------------------------------------ softmax

def softmax_forward(x, *, scale, mask, causal):
    # fp32 math rounded once at the end, as the kernels (and PyTorch's softmax) do: in bf16 the
    # reference's several roundings left sum(y) far enough from 1 that a broadcast float mask's
    # gradient (a sum of dS over many rows) missed the 2x rule (issue #12 fuzz)
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    return reference.softmax(x.float(), scale=scale, mask=mask, causal=causal).to(x.dtype)


def softmax_backward(dy, y, *, scale):
    yf, dyf = y.float(), dy.float()
    dx = scale * yf * (dyf - (dyf * yf).sum(dim=-1, keepdim=True))
    return dx.to(y.dtype)


# ------------------------------------------------------------------ layer norm / rms norm

def layer_norm_forward(x, weight, bias, eps, residual):
    h = x if residual is None else x + residual
    hf = h.float()
    mean = hf.mean(dim=-1)
    rstd = torch.rsqrt(hf.var(dim=-1, unbiased=False) + eps)
    y = reference.layer_norm(h, h.shape[-1], weight, bias, eps)
    return y, mean, rstd, (None if residual is None else h)


def layer_norm_backward(dy, h, weight, bias, mean, rstd, dh_extra):
    xhat = (h.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = dy.float() * (weight.float() if weight is not None else 1.0)
    dx = rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True)
                               - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh_extra is not None:
        dx = dx + dh_extra.float()
    dw = (dy.float() * xhat).sum(0).to(weight.dtype) if weight is not None else None
    db = dy.float().sum(0).to(bias.dtype) if bias is not None else None
    return dx.to(h.dtype), dw, db


def rms_norm_forward(x, weight, eps, residual):
    h = x if residual is None else x + residual
    rstd = torch.rsqrt(h.float().pow(2).mean(dim=-1) + eps)
    y = reference.rms_norm(h, h.shape[-1], weight, eps)
    return y, rstd, (None if residual is None else h)


def rms_norm_backward(dy, h, weight, rstd, dh_extra):
    xhat = h.float() * rstd.unsqueeze(-1)
    g = dy.float() * (weight.float() if weight is not None else 1.0)
    dx = rstd.unsqueeze(-1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh_extra is not None:
        dx = dx + dh_extra.float()
    dw = (dy.float() * xhat).sum(0).to(weight.dtype) if weight is not None else None
    return dx.to(h.dtype), dw


# ------------------------------------------------------------------ linear

def linear_forward(x, weight, bias):
    # x (rows, in_features) may have strided rows (a slice of a wider buffer). ATen's bf16 CPU
    # GEMM (torch 2.14) with more than 16 rows reads such an x's rows whole, the gaps between
    # them included, and multiplies the gaps by 0: NaN or inf there (uninitialised memory)
    # gives NaN outputs (tests/test_linear.py::test_torch_backend_ignores_gaps_between_rows).
    # A copy of x's rows is cheap next to reading the weight.
    if x.device.type == "cpu" and x.shape[0] > 1 and x.stride(0) != x.shape[1]:
        x = x.contiguous()
    return torch.nn.functional.linear(x, weight, bias)


# ------------------------------------------------------------------ swiglu

def swiglu_forward(gate, up):
    # fp32 math (fp64 stays fp64), rounded once at the end, as the kernels do
    acc = torch.promote_types(gate.dtype, torch.float32)
    return reference.swiglu(gate.to(acc), up.to(acc)).to(gate.dtype)


def swiglu_backward(dy, gate, up):
    acc = torch.promote_types(gate.dtype, torch.float32)
    g, u, d = gate.to(acc), up.to(acc), dy.to(acc)
    sig = torch.sigmoid(g)
    dgate = d * u * sig * (1 + g * (1 - sig))
    dup = d * g * sig
    return dgate.to(gate.dtype), dup.to(gate.dtype)


# ------------------------------------------------------------------ rotary

def rotary_forward(x, cos, sin, *, interleaved, offsets, conjugate, out, positions=None):
    # x (B, S, H, D): the sequence is dim 1 and the batch dim 0. Computed in fp32 and rounded
    # once into out, as the kernels do (rotating in bf16 rounds every product: at large logit
    # scales the attention that follows a KV-cache append then disagrees with every kernel).
    acc = torch.promote_types(x.dtype, torch.float32)
    y = reference.apply_rotary(x.to(acc), cos.to(acc), sin.to(acc), interleaved=interleaved,
                               seq_dim=1, offsets=offsets, conjugate=conjugate,
                               positions=positions)
    out.copy_(y)
    return out


def rotary_forward_qk(q, k, cos, sin, *, interleaved, offsets, conjugate, q_out, k_out,
                      positions=None):
    rotary_forward(q, cos, sin, interleaved=interleaved, offsets=offsets, conjugate=conjugate,
                   out=q_out, positions=positions)
    rotary_forward(k, cos, sin, interleaved=interleaved, offsets=offsets, conjugate=conjugate,
                   out=k_out, positions=positions)
    return q_out, k_out


from ._kvcache_torch import kvcache_attention_forward  # noqa: E402,F401  (kvcache_attention)
from ._attention_weights_torch import attention_weights_forward  # noqa: E402,F401
