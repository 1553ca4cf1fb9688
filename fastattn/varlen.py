"""fastattn.varlen_attention: attention over packed variable-length sequences (flash-attn's
flash_attn_varlen_func semantics), validated here and run by the chosen backend in one launch."""

import math

import torch

from . import _backend, _checks
from ._alibi import check_alibi_slopes
from .functional import ATTENTION_DTYPES
from .ops import attention as _attention_ops
from .ops import varlen_attention as _varlen_ops


def _check_cu_seqlens(name, cu, device):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of shape (B + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")


def _check_max_seqlen(name, value):
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     dropout_p=0.0, scale=None, is_causal=False, window=None, softcap=0.0,
                     return_lse=False, deterministic=False, alibi_slopes=None):
    """Attention over B packed sequences of different lengths, without padding.

    q (total_q, H, D); k, v (total_k, Hkv, D) with Hkv dividing H (GQA/MQA, K/V never repeated).
    cu_seqlens_q / cu_seqlens_k: int32 (B + 1,) offsets; sequence b is rows
    [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q and [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k/v.
    Sequences of length 0 and 1 are allowed. max_seqlen_q / max_seqlen_k: Python ints >= every
    sequence length (they size the kernels' grids; as in flash-attn).

    Semantics of flash-attn 2's flash_attn_varlen_func: causal and window are **bottom-right**
    aligned per sequence (query i of a sequence with Sq queries and Sk keys sees key j when
    j <= i + Sk - Sq); window: (left, right) in keys (-1 = unbounded) or an int for both;
    softcap: scores = softcap * tanh(scores / softcap) (0 = off); scale defaults to 1/sqrt(D);
    dropout_p: dropout on the probabilities (seeded from torch's default generator, so
    torch.manual_seed reproduces it; the backward regenerates the same mask). A query row with
    no visible key gives 0.

    Returns out (total_q, H, D) in q's dtype, and with return_lse=True also lse of layout
    (H, total_q) in fp32 (flash-attn's varlen layout; natural log, -inf for rows without keys).
    deterministic: bitwise-reproducible backward (every backend's varlen backward already is).
    alibi_slopes: float32 (H,) or (B, H) on q's device, or None: ALiBi (flash-attn 2's), score
    (i, j) of sequence b, head h gets -alibi_slopes[b, h] * |i + Sk - Sq - j| added after softcap
    (positions within the sequence, bottom-right); no gradient flows to the slopes.

    Backends: triton, cpu (one kernel launch over all sequences), torch (a per-sequence loop);
    fp64 runs on the torch backend. Validation of the offsets' values (start at 0,
    non-decreasing, end at total, max_seqlen large enough) reads cu_seqlens on the host: one
    device synchronisation per call for CUDA tensors.
    """
    _checks.check_tensor("q", q, ndim=3, dtypes=ATTENTION_DTYPES)
    _checks.check_tensor("k", k, ndim=3, dtypes=ATTENTION_DTYPES)
    _checks.check_tensor("v", v, ndim=3, dtypes=ATTENTION_DTYPES)
    _checks.check_same("k", k, "q", q)
    _checks.check_same("v", v, "q", q)
    total_q, h, d = q.shape
    total_k, hkv = k.shape[0], k.shape[1]
    if k.shape[-1] != d:
        raise ValueError(f"k: head dim {k.shape[-1]} must equal q's head dim {d}")
    if v.shape[0] != total_k or v.shape[1] != hkv:
        raise ValueError(f"v: shape {tuple(v.shape)} must match k's tokens and heads "
                         f"{(total_k, hkv)}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"k: kv heads ({hkv}) must divide q's heads ({h})")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same size B + 1, got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    window_left, window_right = _checks.window_pair(window)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    alibi_slopes = check_alibi_slopes(alibi_slopes, cu_seqlens_q.shape[0] - 1, h, q.device)
    # Eager: check the offsets' values now (one host sync). Under torch.compile the op's
    # body checks them on the real tensors instead.
    check_values = torch.compiler.is_compiling()
    if not check_values:
        _varlen_ops.check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k,
                                            max_seqlen_q, max_seqlen_k)

    rng = None
    if dropout_p > 0:
        rng = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64)
    backend = _backend.select(
        "varlen_attention", q.device.type, dtype=q.dtype, head_dim=d, v_head_dim=v.shape[-1],
        causal=bool(is_causal), window=window_left >= 0 or window_right >= 0,
        softcap=float(softcap), dropout_p=float(dropout_p), gqa=h != hkv,
        deterministic=bool(deterministic), alibi=alibi_slopes is not None,
        device=q.device.type)
    out, lse = _backend.eager_call(
        _varlen_ops.varlen_attention_op, _varlen_ops.varlen_attention_impl, backend,
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), rng, scale,
        bool(is_causal), window_left, window_right, float(softcap), float(dropout_p),
        bool(deterministic), check_values, backend, *_attention_ops.alibi_arg(alibi_slopes))
    return (out, lse) if return_lse else out
