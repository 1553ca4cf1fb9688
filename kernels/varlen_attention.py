"""Triton packed variable-length attention (fastattn.varlen_attention): launchers.

Implements the "Varlen attention" section of docs/backend-contract.md:

    varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale,
                   causal, window_left, window_right, softcap, dropout_p, seed, offset,
                   alibi_slopes=None)
        -> (out (total_q, H, D), lse (H, total_q) fp32)
    varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, *, <same keywords>, deterministic) -> (dq, dk, dv)
    varlen_dropout_keep_mask(B, H, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset, device)
    unsupported(op, **case) -> str | None

The kernels are the dense attention kernels (_attention_fwd.py, _attention_bwd.py) in their
VARLEN mode: one launch over (query blocks of max_seqlen_q) x sequences x heads; program b reads
its sequence's offsets from cu_seqlens and exits when its block lies past the sequence's end.
Causal/window are bottom-right aligned per sequence (flash-attn). No host synchronisation:
cu_seqlens are read on the device only. The backward uses no atomics (deterministic).
"""

import math

import torch
import triton

from . import _attention_configs as cfg
from . import attention as _dense
from ._attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from ._attention_fwd import attn_fwd_kernel
from ._compat import interpreting, launch


class _VarlenCase:
    """Normalised arguments shared by the varlen forward and backward. fastattn.varlen_attention
    validates them (offsets included) and `unsupported` turns away what the kernels cannot run;
    here they are only asserted."""

    def __init__(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window_left,
                 window_right, softcap, dropout_p, seed, offset, alibi_slopes=None):
        assert q.dim() == 3 and k.shape == v.shape and k.dtype == q.dtype == v.dtype
        for cu in (cu_q, cu_k):
            assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device
        assert cu_q.shape == cu_k.shape
        self.total_q, self.H, self.D = q.shape
        self.total_k, self.Hkv = k.shape[0], k.shape[1]
        assert self.Hkv > 0 and self.H % self.Hkv == 0
        assert 1 <= self.D <= _dense.MAX_HEAD_DIM and k.shape[2] == self.D
        self.B = cu_q.shape[0] - 1
        self.max_q, self.max_k = int(max_q), int(max_k)
        self.cu_q, self.cu_k = cu_q.contiguous(), cu_k.contiguous()
        self.row_len = _dense._padded_dim(self.D, q.element_size())
        self.q, self.k, self.v = (_dense._aligned_rows(t, self.row_len) for t in (q, k, v))
        self.group = self.H // self.Hkv
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.D)
        self.wl = int(window_left) if window_left is not None else -1
        self.wr = int(window_right) if window_right is not None else -1
        self.softcap = float(softcap or 0.0)
        self.dropout_p = float(dropout_p)
        assert 0.0 <= self.dropout_p < 1.0
        # [seed, offset] for the kernels to load, or a dummy pointer without dropout
        self.rng = _dense.rng_tensor(seed, offset, q) if self.dropout_p > 0 else q
        self.block_d = cfg.block_d_of(self.D)
        self.consts = dict(
            BLOCK_D=self.block_d, EVEN_D=(self.D == self.block_d), ALIGNED=True,
            IS_CAUSAL=bool(causal), HAS_WL=self.wl >= 0, HAS_WR=self.wr >= 0, MASK_KIND=0,
            HAS_KL=False, HAS_SOFTCAP=self.softcap > 0, HAS_DROPOUT=self.dropout_p > 0,
            DOT_PREC=_dense._dot_precision(q.dtype), VARLEN=True,
            **_dense.alibi_kernel_args(alibi_slopes, self.B, self.H, q))

    @property
    def arch(self):
        return None if interpreting() else cfg.device_arch(self.q)

    def scalars(self):
        # Sq, Sk = the max lengths (grid, dropout RNG index); shift is set per sequence
        return [self.max_q, self.max_k, self.D, self.group, 0, self.wl, self.wr, self.scale,
                self.softcap, self.dropout_p, self.rng]

    def lse_strides(self):
        return 0, self.total_q                       # lse / delta (H, total_q)

    def empty(self):
        return self.total_q == 0 or self.total_k == 0 or self.B == 0 or self.max_q == 0 \
            or self.max_k == 0


def _strides3(t):
    """(batch, head, row) strides of a packed (total, heads, D) tensor: the batch stride is 0
    (sequence offsets come from cu_seqlens)."""
    return 0, t.stride(1), t.stride(0)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale,
                   causal, window_left, window_right, softcap, dropout_p, seed, offset,
                   alibi_slopes=None):
    c = _VarlenCase(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                    causal, window_left, window_right, softcap, dropout_p, seed, offset,
                    alibi_slopes)
    out = _dense._empty_rows((c.total_q, c.H, c.D), c.row_len, q)
    lse = torch.empty((c.H, c.total_q), device=q.device, dtype=torch.float32)
    if c.empty():                                    # no query sees a key
        return _dense._finish(out.zero_(), c.D), lse.fill_(float("-inf"))
    args = [c.q, c.k, c.v, out, lse, c.q, c.q, c.cu_q, c.cu_k,
            *_strides3(c.q), *_strides3(c.k), *_strides3(c.v), *_strides3(out), 0, 0, 0, 0,
            *c.lse_strides(), c.H, *c.scalars()]
    _dense._launch(attn_fwd_kernel, "fwd", c,
                   lambda bm, bn: triton.cdiv(c.max_q, bm) * c.B * c.H, args, c.consts,
                   c.max_q, c.max_k)
    return _dense._finish(out, c.D), lse


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, *, scale, causal, window_left, window_right, softcap, dropout_p,
                    seed, offset, deterministic, alibi_slopes=None):
    del deterministic                                # no atomics: always deterministic
    c = _VarlenCase(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                    causal, window_left, window_right, softcap, dropout_p, seed, offset,
                    alibi_slopes)
    assert dout.shape == q.shape and out.shape == q.shape and lse.shape == (c.H, c.total_q)
    dq = _dense._empty_rows((c.total_q, c.H, c.D), c.row_len, q)
    dk = _dense._empty_rows((c.total_k, c.Hkv, c.D), c.row_len, k)
    dv = _dense._empty_rows((c.total_k, c.Hkv, c.D), c.row_len, v)
    if c.empty():
        return (_dense._finish(dq.zero_(), c.D), _dense._finish(dk.zero_(), c.D),
                _dense._finish(dv.zero_(), c.D))
    dout = _dense._aligned_rows(dout.to(q.dtype), c.row_len)
    out = _dense._aligned_rows(out, c.row_len)
    lse = lse.to(torch.float32).contiguous()

    # delta (H, total_q), lse's layout: the dense preprocess over all rows as one sequence
    delta = torch.empty((c.H, c.total_q), device=q.device, dtype=torch.float32)
    out4, dout4 = out.transpose(0, 1).unsqueeze(0), dout.transpose(0, 1).unsqueeze(0)
    pre_bm = 16 if interpreting() else cfg.preprocess_block_m(c.block_d)
    launch(attn_bwd_preprocess_kernel)[(triton.cdiv(c.total_q, pre_bm) * c.H,)](
        out4, dout4, delta, *_dense._strides3(out4), *_dense._strides3(dout4), c.H, c.total_q,
        c.D, BLOCK_M=pre_bm, BLOCK_D=c.block_d, ALIGNED=True,
        DOT_PREC=c.consts["DOT_PREC"])

    # Key rows of no sequence's visible range still get their (zero) gradient: the dK/dV
    # programs cover every row of every sequence.
    args = [c.q, c.k, c.v, dout, lse, delta, dk, dv, c.q, c.q, c.cu_q, c.cu_k,
            *_strides3(c.q), *_strides3(c.k), *_strides3(c.v), *_strides3(dout),
            *_strides3(dk), *_strides3(dv), 0, 0, 0, 0, *c.lse_strides(), c.H, c.Hkv,
            *c.scalars()]
    d_split = cfg.dkdv_d_split(c.arch, c.block_d, c.q.element_size(), c.consts["DOT_PREC"])
    _dense._launch(attn_bwd_dkdv_kernel, "dkdv", c,
                   lambda bm, bn: triton.cdiv(c.max_k, bn) * c.B * c.Hkv * d_split, args,
                   dict(c.consts, D_SPLIT=d_split), c.max_q, c.max_k)

    args = [c.q, c.k, c.v, dout, lse, delta, dq, delta, c.q, c.q, c.cu_q, c.cu_k,
            *_strides3(c.q), *_strides3(c.k), *_strides3(c.v), *_strides3(dout),
            *_strides3(dq), 0, 0, 0, 0, *c.lse_strides(), c.H, *c.scalars()]
    _dense._launch(attn_bwd_dq_kernel, "dq", c,
                   lambda bm, bn: triton.cdiv(c.max_q, bm) * c.B * c.H, args,
                   dict(c.consts, MASK_GRAD=False), c.max_q, c.max_k)
    return _dense._finish(dq, c.D), _dense._finish(dk, c.D), _dense._finish(dv, c.D)


def varlen_dropout_keep_mask(batch, heads, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset,
                             device):
    """Keep-mask (B, H, max_q, max_k) of the varlen kernels; sequence b uses
    [b, :, :len_q, :len_k] (the RNG is indexed as in the dense (B, H, max_q, max_k) case)."""
    return _dense.dropout_keep_mask((batch, heads, max_seqlen_q, max_seqlen_k), dropout_p, seed,
                                    offset, device=device)


def unsupported(op, **case):
    """Reason this backend cannot run the varlen case, or None (the dense checks apply)."""
    if op != "varlen_attention":
        return f"op {op!r} is not varlen_attention"
    return _dense.unsupported("attention", **case)


def static_variants(arch):
    """The VARLEN configurations the launchers may pick on `arch`, for the static report (the
    ALiBi ones last)."""
    from ._attention_static import alibi_static_variants, varlen_static_variants
    return varlen_static_variants(arch) + alibi_static_variants(arch, varlen=True)
