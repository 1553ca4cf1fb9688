"""Plain PyTorch versions of every fastattn op: the oracle for tests and the last fallback.

Everything here is written for clarity, not speed, and is differentiable with autograd. The
semantics are those of docs/backend-contract.md. Computation happens in the input dtype; tests
build the fp32 oracle by upcasting the inputs first.
"""

import math

import torch

ALIGNMENTS = ("top_left", "bottom_right")


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

def attention_visibility(sq, sk, *, causal=False, alignment="top_left", window_left=-1,
                         window_right=-1, device=None):
    """Bool (Sq, Sk): True where key j is visible to query i under causal/window rules."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    shifted = i + (sk - sq if alignment == "bottom_right" else 0)
    visible = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= shifted
    if window_left >= 0:
        visible &= j >= shifted - window_left
    if window_right >= 0:
        visible &= j <= shifted + window_right
    return visible


def alibi_bias(alibi_slopes, sq, sk, shift, dtype):
    """ALiBi bias (B, H, Sq, Sk) in `dtype`: -slope[b, h] * |i + shift - j|, with shift the
    diagonal offset of the causal/window rules (0 top-left, Sk - Sq bottom-right).
    alibi_slopes: (B, H) (or (H,), broadcast over the batch)."""
    i = torch.arange(sq, device=alibi_slopes.device).unsqueeze(1)
    j = torch.arange(sk, device=alibi_slopes.device).unsqueeze(0)
    dist = (i + shift - j).abs().to(dtype)                                # (Sq, Sk)
    slopes = alibi_slopes.to(dtype)
    if slopes.dim() == 1:
        slopes = slopes.unsqueeze(0)
    return -slopes[:, :, None, None] * dist


def attention(q, k, v, *, mask=None, scale=None, causal=False, alignment="top_left",
              window_left=-1, window_right=-1, softcap=0.0, key_lengths=None,
              dropout_mask=None, dropout_p=0.0, return_lse=False, alibi_slopes=None):
    """Attention in SDPA layout.

    q (B, H, Sq, D); k, v (B, Hkv, Sk, D) with H % Hkv == 0 (GQA by repeating heads here, which
    is fine for an oracle). mask: bool (True = may attend) or float (added), broadcastable to
    (B, H, Sq, Sk). dropout_mask: bool keep-mask broadcastable to (B, H, Sq, Sk), applied with
    1 / (1 - dropout_p) scaling. alibi_slopes: None or fp32 (B, H) / (H,): the ALiBi bias
    -slope[b, h] * |i + shift - j| is added to every score after softcap (shift as the causal
    rule's; see alibi_bias). Rows with no visible key give 0 (and lse = -inf).
    Returns out (B, H, Sq, Dv), plus lse (B, H, Sq) in fp32 when return_lse.
    """
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    scores = torch.matmul(q, k.transpose(-2, -1)) * scale            # (B, H, Sq, Sk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        shift = sk - sq if alignment == "bottom_right" else 0
        scores = scores + alibi_bias(alibi_slopes, sq, sk, shift, scores.dtype)
    visible = attention_visibility(sq, sk, causal=causal, alignment=alignment,
                                   window_left=window_left, window_right=window_right,
                                   device=q.device).expand(b, h, sq, sk)
    if key_lengths is not None:
        keys = torch.arange(sk, device=q.device).view(1, 1, 1, sk)
        visible = visible & (keys < key_lengths.view(b, 1, 1, 1).to(q.device))
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            scores = scores + mask
    scores = scores.masked_fill(~visible, float("-inf"))

    lse = torch.logsumexp(scores.float(), dim=-1)                     # (B, H, Sq)
    empty = torch.isneginf(lse)
    # Subtract a finite row max so fully masked rows give exp(-inf) = 0, not NaN.
    # (detached: softmax is shift-invariant, and lse's own backward is NaN on empty rows)
    row_max = torch.where(empty, torch.zeros_like(lse), lse).detach().to(scores.dtype).unsqueeze(-1)
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    probs = probs / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_mask is not None and dropout_p > 0:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.matmul(probs, v)
    return (out, lse) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=False,
                     window_left=-1, window_right=-1, softcap=0.0, dropout_mask=None,
                     dropout_p=0.0, return_lse=False, alibi_slopes=None):
    """Packed variable-length attention: a per-sequence loop over `attention` (the oracle).

    q (total_q, H, D); k, v (total_k, Hkv, D); cu_seqlens_* (B+1,) int offsets of each
    sequence's tokens. Causal and window are bottom-right aligned per sequence (flash-attn).
    dropout_mask: bool keep-mask (B, H, max_q, max_k) or None; sequence b uses
    [b, :, :len_q, :len_k]. alibi_slopes: None or (B, H) (or (H,)): sequence b's ALiBi bias
    uses row b, positions within the sequence. Returns out (total_q, H, Dv), plus lse
    (H, total_q) fp32.
    """
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    h = q.shape[1]
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1).unsqueeze(0)        # (1, H, Sq_b, D)
        ks = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).unsqueeze(0)        # (1, Hkv, Sk_b, D)
        vs = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).unsqueeze(0)
        keep = None
        if dropout_mask is not None and dropout_p > 0:
            keep = dropout_mask[b:b + 1, :, :qs.shape[2], :ks.shape[2]]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes.expand(len(cu_q) - 1, h)[b:b + 1]
        out, lse = attention(qs, ks, vs, scale=scale, causal=causal, alignment="bottom_right",
                             window_left=window_left, window_right=window_right, softcap=softcap,
                             dropout_mask=keep, dropout_p=dropout_p, return_lse=True,
                             alibi_slopes=slopes)
        outs.append(out[0].transpose(0, 1))                              # (Sq_b, H, Dv)
        lses.append(lse[0])                                              # (H, Sq_b)
    out = torch.cat(outs, 0) if outs else q.new_empty(0, h, v.shape[-1])
    lse = torch.cat(lses, 1) if lses else q.new_empty(h, 0, dtype=torch.float32)
    return (out, lse) if return_lse else out


def attention_weights(q, k, *, mask=None, scale=None, causal=False, alignment="top_left",
                      window_left=-1, window_right=-1, softcap=0.0, key_lengths=None,
                      alibi_slopes=None):
    """The normalised attention probabilities (B, H, Sq, Sk) of `attention` (no dropout)."""
    sk = k.shape[2]
    eye = torch.eye(sk, dtype=q.dtype, device=q.device)
    v = eye.expand(k.shape[0], k.shape[1], sk, sk)
    return attention(q, k, v, mask=mask, scale=scale, causal=causal, alignment=alignment,
                     window_left=window_left, window_right=window_right, softcap=softcap,
                     key_lengths=key_lengths, alibi_slopes=alibi_slopes)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Merge two attention results over disjoint key sets (same queries): returns (out, lse)
    equal to attention over the union of the keys. out_* (..., D), lse_* (...) fp32 log-sum-exp.
    Math in fp32 (fp64 stays fp64); a row with lse_a = lse_b = -inf gives out 0, lse -inf."""
    acc = torch.promote_types(out_a.dtype, torch.float32)
    la, lb = lse_a.to(acc), lse_b.to(acc)                # fp64 stays fp64
    m = torch.maximum(la, lb)
    empty = torch.isneginf(m)
    m = torch.where(empty, torch.zeros_like(m), m)
    ea, eb = torch.exp(la - m), torch.exp(lb - m)     # 0 on an empty side
    total = torch.where(empty, torch.ones_like(m), ea + eb)
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(total))
    wa, wb = (ea / total).unsqueeze(-1), (eb / total).unsqueeze(-1)
    out = wa * out_a.to(acc) + wb * out_b.to(acc)
    return out.to(out_a.dtype), lse.to(lse_a.dtype)


# ----------------------------------------------------------------------------------------------
# softmax
# ----------------------------------------------------------------------------------------------

def softmax(x, dim=-1, *, scale=None, mask=None, causal=False):
    """softmax(x * scale + float mask) over `dim`; bool mask True = keep; causal masks j > i
    (i indexes dim -2, j indexes `dim` which must then be the last dim). Empty rows give 0."""
    if causal and dim not in (-1, x.dim() - 1):
        raise ValueError("softmax: causal=True needs dim=-1")
    scores = x if scale is None else x * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            scores = scores + mask
    if causal:
        m, n = x.shape[-2], x.shape[-1]
        tri = torch.ones(m, n, dtype=torch.bool, device=x.device).tril()
        keep = tri if keep is None else keep & tri
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.detach().amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=dim, keepdim=True)
    return e / torch.where(denom == 0, torch.ones_like(denom), denom)


# ----------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------

def _stat_dtype(dtype):
    """Statistics in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _normalized_dims(x, normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} does not match the trailing dims of "
                         f"input {tuple(x.shape)}")
    return tuple(range(x.dim() - len(shape), x.dim()))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, residual=None):
    """F.layer_norm semantics with fp32 statistics; with `residual`, normalises h = x + residual
    and returns (y, h)."""
    h = x if residual is None else x + residual
    dims = _normalized_dims(h, normalized_shape)
    hf = h.to(_stat_dtype(h.dtype))
    mean = hf.mean(dim=dims, keepdim=True)
    var = hf.var(dim=dims, unbiased=False, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(hf.dtype)
    if bias is not None:
        y = y + bias.to(hf.dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm(x, normalized_shape, weight=None, eps=None, residual=None):
    """F.rms_norm semantics (eps=None means torch.finfo(x.dtype).eps) with fp32 statistics;
    with `residual`, normalises h = x + residual and returns (y, h)."""
    h = x if residual is None else x + residual
    dims = _normalized_dims(h, normalized_shape)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    hf = h.to(_stat_dtype(h.dtype))
    y = hf * torch.rsqrt(hf.pow(2).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(hf.dtype)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


# ----------------------------------------------------------------------------------------------
# gated activations
# ----------------------------------------------------------------------------------------------

def swiglu(gate, up):
    """SwiGLU: silu(gate) * up (F.silu semantics), in the inputs' dtype."""
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------------

def linear(input, weight, bias=None):
    """F.linear semantics: input (..., in_features) @ weight (out_features, in_features)^T
    (+ bias (out_features,)), in the inputs' dtype, as a matmul and an add."""
    y = torch.matmul(input, weight.transpose(0, 1))
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------------
# rotary embeddings
# ----------------------------------------------------------------------------------------------

def rotary_cache(seq_len, rot_dim, *, base=10000.0, scaling=None, device=None,
                 dtype=torch.float32):
    """cos, sin of shape (seq_len, rot_dim // 2).

    scaling: None, ("linear", f) — positions divided by f (position interpolation) — or
    ("ntk", f) — NTK-aware: base multiplied by f ** (rot_dim / (rot_dim - 2)).
    """
    if rot_dim % 2:
        raise ValueError(f"rot_dim must be even, got {rot_dim}")
    positions = torch.arange(seq_len, device=device, dtype=torch.float64)
    if scaling is not None:
        kind, factor = scaling
        if kind == "linear":
            positions = positions / factor
        elif kind == "ntk":
            base = base * factor ** (rot_dim / (rot_dim - 2)) if rot_dim > 2 else base
        else:
            raise ValueError(f"scaling must be ('linear', f) or ('ntk', f), got {scaling!r}")
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=device,
                                            dtype=torch.float64) / rot_dim))
    angles = torch.outer(positions, inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin, *, interleaved=False, seq_dim=-2, offsets=None, conjugate=False,
                 positions=None):
    """Rotate the first R = 2 * cos.shape[-1] features of x.

    x (..., S, ..., D) with the sequence at `seq_dim`; dim 0 is the batch for `offsets` (B,),
    which shift each batch's positions, or `positions` (B, S), the cache row of every token
    (left-padded batches, packed sequences). NeoX style pairs (d, d + R/2), GPT-J style (interleaved)
    pairs (2d, 2d + 1). conjugate=True rotates by the negative angle (the backward).
    """
    half = cos.shape[-1]
    rot = 2 * half
    if rot > x.shape[-1]:
        raise ValueError(f"cos/sin cover {rot} features but the head dim is {x.shape[-1]}")
    seq_dim = seq_dim % x.dim()
    s = x.shape[seq_dim]
    pos = torch.arange(s, device=x.device)
    if positions is not None:
        idx = positions.to(x.device).long()                           # (B, S)
        c, si = cos[idx], sin[idx]                                    # (B, S, R/2)
        view = [1] * x.dim()
        view[0], view[seq_dim], view[-1] = x.shape[0], s, half
        c, si = c.reshape(view), si.reshape(view)
    elif offsets is None:
        c, si = cos[pos], sin[pos]                                    # (S, R/2)
        view = [1] * x.dim()
        view[seq_dim], view[-1] = s, half
        c, si = c.view(view), si.view(view)
    else:
        idx = pos.unsqueeze(0) + offsets.to(x.device).long().unsqueeze(1)   # (B, S)
        c, si = cos[idx], sin[idx]                                    # (B, S, R/2)
        view = [1] * x.dim()
        view[0], view[seq_dim], view[-1] = x.shape[0], s, half
        c, si = c.reshape(view), si.reshape(view)
    if conjugate:
        si = -si
    c, si = c.to(x.dtype), si.to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        a, b = x_rot[..., 0::2], x_rot[..., 1::2]
        ra, rb = a * c - b * si, a * si + b * c
        rotated = torch.stack((ra, rb), dim=-1).flatten(-2)
    else:
        a, b = x_rot[..., :half], x_rot[..., half:]
        rotated = torch.cat((a * c - b * si, a * si + b * c), dim=-1)
    return torch.cat((rotated, x_pass), dim=-1)


def rotate_half_rope(x, cos, sin):
    """The eager formula most models use: x * cos + rotate_half(x) * sin, with cos/sin already
    expanded to x's rotary width (the benchmark's PyTorch baseline)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin
