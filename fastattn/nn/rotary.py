"""RotaryEmbedding: a cos/sin cache grown on demand and the rotation of q and k."""

import torch
import torch.nn as nn

from .. import functional as F


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of the first `dim` features of each head.

    RotaryEmbedding(dim, *, base=10000.0, scaling=None, max_seq_len=2048, interleaved=False)
    dim: rotated features (even, <= head dim). scaling: None, ("linear", f) or ("ntk", f)
    (see fastattn.rotary_cache). interleaved: GPT-J pairs (2d, 2d+1) instead of NeoX halves.
    The cache holds max_seq_len positions and doubles when a call needs more; it is not part
    of the state_dict (it is a pure function of the constructor arguments).
    """

    def __init__(self, dim, *, base=10000.0, scaling=None, max_seq_len=2048, interleaved=False,
                 device=None):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even int, got {dim!r}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        if base <= 0:
            raise ValueError(f"base must be > 0, got {base}")
        self.dim, self.base, self.scaling = dim, float(base), scaling
        self.interleaved = bool(interleaved)
        cos, sin = F.rotary_cache(max_seq_len, dim, base=self.base, scaling=scaling,
                                  device=device)
        self.register_buffer("cos", cos, persistent=False)                 # (S_cache, dim/2)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def max_seq_len(self):
        return self.cos.shape[0]

    def extra_repr(self):
        s = f"{self.dim}, base={self.base}, max_seq_len={self.max_seq_len}"
        if self.scaling is not None:
            s += f", scaling={self.scaling!r}"
        return s + (", interleaved=True" if self.interleaved else "")

    def tables(self, positions, device):
        """cos, sin covering `positions` positions on `device` (the cache grows if needed)."""
        if positions > self.max_seq_len or self.cos.device != torch.device(device):
            length = self.max_seq_len
            while length < positions:
                length *= 2
            self.cos, self.sin = F.rotary_cache(length, self.dim, base=self.base,
                                                scaling=self.scaling, device=device)
        return self.cos, self.sin

    def forward(self, q, k, *, seq_dim=-2, offsets=None):
        """Rotate q and k (sequence at seq_dim, batch at dim 0); returns (q, k).

        offsets (B,) int: per-batch position of the first token (decoding with a KV cache).
        """
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            raise TypeError("q and k must be tensors")
        for name, t in (("q", q), ("k", k)):
            if t.dim() < 2 or t.shape[-1] < self.dim:
                raise ValueError(f"{name} of shape {tuple(t.shape)} has fewer than dim="
                                 f"{self.dim} features in its last dimension")
        s_q, s_k = q.shape[seq_dim], k.shape[seq_dim]
        needed = max(s_q, s_k)
        if offsets is not None and not torch.compiler.is_compiling():
            needed += int(offsets.max()) if offsets.numel() else 0
        cos, sin = self.tables(needed, q.device)
        if s_q == s_k and (q.dim() == k.dim()) and (q.dim() == 2 or q.shape[0] == k.shape[0]):
            return F.apply_rotary_qk(q, k, cos, sin, interleaved=self.interleaved,
                                     seq_dim=seq_dim, offsets=offsets)
        return (F.apply_rotary(q, cos, sin, interleaved=self.interleaved, seq_dim=seq_dim,
                               offsets=offsets),
                F.apply_rotary(k, cos, sin, interleaved=self.interleaved, seq_dim=seq_dim,
                               offsets=offsets))
