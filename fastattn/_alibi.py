"""Validation of the `alibi_slopes` argument, shared by every public attention function.

ALiBi (flash-attn 2's semantics): score s_ij gets -slope[b, h] * |i + shift - j| added (after
softcap), with shift the diagonal offset of the call's causal/window rule (0 top-left,
Sk - Sq bottom-right; per sequence for varlen; cache length - Sq for kvcache). The slope is
per query head (GQA too); slopes receive no gradient.
"""

import torch


def check_alibi_slopes(alibi_slopes, batch, heads, device):
    """None, or alibi_slopes as the contiguous float32 (batch, heads) tensor every op and backend
    below the public function takes. Accepts float32 (heads,) or (batch, heads) on `device`,
    finite, not requiring grad; anything else is a ValueError naming alibi_slopes."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise ValueError(f"alibi_slopes must be a torch.Tensor or None, got "
                         f"{type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise ValueError(f"alibi_slopes must have dtype torch.float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}) "
                         f"(nheads or (batch, nheads)), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes requires grad, but fastattn computes no gradient for the "
                         "ALiBi slopes; pass alibi_slopes.detach()")
    # A data-dependent check (one host sync): torch.compile traces without it.
    if (alibi_slopes.numel() and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(alibi_slopes).all())):
        raise ValueError("alibi_slopes must be finite (got NaN or inf)")
    return alibi_slopes.detach().expand(batch, heads).contiguous()
