"""Turn nn.MultiheadAttention's masks into what the fused attention takes.

nn.MultiheadAttention masks use True = masked out (or a float added to the scores); the
attention op takes one mask with True = may attend (or float added), `key_lengths` and a
causal flag. The common patterns never become a materialised (N, H, L, S) mask:
- an attn_mask that is exactly the causal pattern (or is_causal=True) -> causal flag;
- a bool key_padding_mask that pads on the right -> key_lengths;
- any other key_padding_mask -> an (N, 1, 1, S) view, expanded with stride 0.
Only two general masks together are combined into one tensor.
Pattern detection reads mask values, so it is skipped under torch.compile (the masks are
then used as given: same result, less fast).
"""

import torch


def check_mask_dtype(name, mask):
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{name} must be a bool or floating tensor, got {mask.dtype}")


def _hidden_causal(q_len, k_len, device):
    """Bool (L, S), True above the diagonal: the top-left causal pattern in MHA convention."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(1)


def is_causal_pattern(attn_mask, q_len, k_len):
    """True when attn_mask (L, S) or (X, L, S) is exactly the top-left causal mask, as a bool
    mask or as a float 0 / -inf mask (nn.Transformer.generate_square_subsequent_mask)."""
    hidden = _hidden_causal(q_len, k_len, attn_mask.device)
    if attn_mask.dtype == torch.bool:
        return torch.equal(attn_mask, hidden.expand_as(attn_mask))
    expected = torch.zeros(q_len, k_len, dtype=attn_mask.dtype, device=attn_mask.device)
    expected.masked_fill_(hidden, float("-inf"))
    return torch.equal(attn_mask, expected.expand_as(attn_mask))


def right_padding_lengths(key_padding_mask):
    """(N,) int32 key lengths if the bool (N, S) mask is True exactly on a suffix of each
    row, else None."""
    n, s = key_padding_mask.shape
    lengths = (~key_padding_mask).sum(1)
    pattern = torch.arange(s, device=key_padding_mask.device).unsqueeze(0) >= lengths.unsqueeze(1)
    if not torch.equal(key_padding_mask, pattern):
        return None
    return lengths.to(torch.int32)


def _pad_keys(mask, n_extra):
    """Append n_extra always-visible key columns (bias_k / add_zero_attn keys)."""
    if n_extra == 0:
        return mask
    shape = list(mask.shape[:-1]) + [n_extra]
    if mask.dtype == torch.bool:
        return torch.cat([mask, mask.new_ones(shape)], dim=-1)
    return torch.cat([mask, mask.new_zeros(shape)], dim=-1)


def _as_float(attend, dtype):
    return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill_(
        ~attend, float("-inf"))


def prepare(attn_mask, key_padding_mask, is_causal, *, batch, heads, q_len, k_len, n_extra,
            dtype, device, need_weights):
    """-> (mask, key_lengths, causal) for the attention op.

    attn_mask: None, (L, S) or (N*H, L, S) in MHA convention; key_padding_mask: None or
    (N, S); both already shape-checked. n_extra: always-visible keys appended after the S
    keys. mask: None or a tensor broadcastable to (N, H, L, S + n_extra), True = may attend
    or float (in `dtype`) added. causal is top-left.
    need_weights: PyTorch gives is_causal two meanings (see MultiHeadAttention); it matters
    only when keys are appended.
    """
    compiling = torch.compiler.is_compiling()
    if is_causal and key_padding_mask is None and not need_weights:
        # PyTorch's SDPA path: top-left causal over all keys, appended ones included
        return None, None, True
    causal = False
    if is_causal:
        # PyTorch's is_causal: a hint that attn_mask is the causal mask; trust it
        causal, attn_mask = True, None
    elif (attn_mask is not None and not compiling and not attn_mask.requires_grad
          and is_causal_pattern(attn_mask, q_len, k_len)):
        causal, attn_mask = True, None
    key_lengths = None
    if (key_padding_mask is not None and key_padding_mask.dtype == torch.bool and n_extra == 0
            and not compiling):
        key_lengths = right_padding_lengths(key_padding_mask)
        if key_lengths is not None:
            key_padding_mask = None
    if causal and n_extra:
        # the flag cannot leave the appended keys visible to every query: spell it out (L, S)
        causal, attn_mask = False, _hidden_causal(q_len, k_len, device)

    attend = None
    if attn_mask is not None:
        m = attn_mask.view(1, 1, q_len, k_len) if attn_mask.dim() == 2 else \
            attn_mask.view(batch, heads, q_len, k_len)
        attend = _pad_keys(~m if m.dtype == torch.bool else m.to(dtype), n_extra)
    padding = None
    if key_padding_mask is not None:
        m = key_padding_mask.view(batch, 1, 1, k_len)
        padding = _pad_keys(~m if m.dtype == torch.bool else m.to(dtype), n_extra)

    if attend is None or padding is None:
        mask = attend if padding is None else padding
    elif attend.dtype == torch.bool and padding.dtype == torch.bool:
        mask = attend & padding
    else:
        if attend.dtype == torch.bool:
            attend = _as_float(attend, dtype)
        if padding.dtype == torch.bool:
            padding = _as_float(padding, dtype)
        mask = attend + padding
    return mask, key_lengths, causal
