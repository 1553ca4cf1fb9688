"""The documented public functions: validate, normalise layouts, pick a backend, call the op.

Each function has the signature of its PyTorch counterpart plus keyword-only extras. The
backend is chosen per call (see fastattn.use_backend); `auto` never fails because the torch
backend supports every case.
"""

import math

import torch

from . import _backend, _C_ops, _checks, _eager
from ._alibi import check_alibi_slopes
from .ops import attention as _attention_ops
from .ops import layer_norm as _layer_norm_ops
from .ops import linear as _linear_ops
from .ops import rotary as _rotary_ops
from .ops import softmax as _softmax_ops
from .ops import swiglu as _swiglu_ops

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------ attention

def _finite_float(name, x, *, minimum=None):
    """float(x), or a ValueError naming `name` for NaN, +-inf or a value below `minimum`."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {x!r}") from None
    if not math.isfinite(f) or (minimum is not None and f < minimum):
        bound = "" if minimum is None else f" and >= {minimum}"
        raise ValueError(f"{name} must be finite{bound}, got {x!r}")
    return f


def _check_key_lengths(key_lengths, b, sk, device):
    """key_lengths as an int tensor (B,) on `device`; every value must lie in [0, Sk]
    (checked, never clamped: a length outside it is a caller bug)."""
    _checks.check_tensor("key_lengths", key_lengths, ndim=1, dtypes=(torch.int32, torch.int64))
    if key_lengths.shape[0] != b:
        raise ValueError(f"key_lengths must have shape ({b},), got {tuple(key_lengths.shape)}")
    key_lengths = key_lengths.to(device)
    # A data-dependent check: torch.compile traces without it (the CPU kernel still checks).
    if key_lengths.numel() and not torch.compiler.is_compiling():
        lo, hi = int(key_lengths.min()), int(key_lengths.max())
        if lo < 0 or hi > sk:
            raise ValueError(f"key_lengths must be in [0, Sk] = [0, {sk}] (the key length), "
                             f"got values in [{lo}, {hi}]")
    return key_lengths


def _empty_head_dim_attention(query, key, value, mask, key_lengths, is_causal, alignment,
                              window_left, window_right, softcap, alibi_slopes=None):
    """Head dim 0 (PyTorch returns an empty output): no kernel runs. The output is the empty
    (B, H, Sq, 0) tensor and lse the log-sum-exp of the scores, which are 0 (+ a float mask),
    over the visible keys; written with torch ops so autograd still reaches every input."""
    from . import reference
    h, hkv = query.shape[1], key.shape[1]
    k = key.repeat_interleave(h // hkv, dim=1) if h != hkv else key
    v = value.repeat_interleave(h // hkv, dim=1) if h != hkv else value
    out, lse = reference.attention(query, k, v, mask=mask, scale=1.0, causal=is_causal,
                                   alignment=alignment, window_left=window_left,
                                   window_right=window_right, softcap=softcap,
                                   key_lengths=key_lengths, return_lse=True,
                                   alibi_slopes=alibi_slopes)
    return out, lse.float()


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, *, scale=None, enable_gqa=False,
                                 window=None, softcap=0.0, causal_alignment="top_left",
                                 key_lengths=None, return_lse=False, deterministic=False,
                                 alibi_slopes=None):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention on fused kernels.

    Same signature as PyTorch's (whose native schema makes `scale` and `enable_gqa`
    keyword-only).

    query (B, H, Sq, D) or (H, Sq, D); key, value (B, Hkv, Sk, D). With enable_gqa=True, Hkv may
    divide H (grouped-query / multi-query attention, without repeating K/V in memory).
    attn_mask: bool (True = may attend) or float (added), broadcastable to (B, H, Sq, Sk); a float
    mask that requires grad receives its gradient. Unlike PyTorch, attn_mask together with
    is_causal is allowed and means both. A query row whose keys are all masked gives 0.

    Keyword-only extras:
      window: (left, right) sliding window in keys (-1 = unbounded), or an int for both.
      softcap: tanh logit soft-capping, scores = softcap * tanh(scores / softcap) (0 = off).
      causal_alignment: "top_left" (PyTorch's is_causal) or "bottom_right" (FlashAttention's,
        for decoding with Sq < Sk); it applies to is_causal and window.
      key_lengths: int tensor (B,): keys at positions >= key_lengths[b] are masked (padding),
        without materialising a mask.
      return_lse: also return the log-sum-exp (B, H, Sq) in fp32 (-inf for empty rows).
      deterministic: a bitwise-reproducible backward: two identical calls in one process give
        bitwise equal gradients. Every backend keeps it (none uses atomics), so the flag never
        raises: `triton` always (one autotuned config per process), `cpu` for a fixed
        torch.get_num_threads() (the thread count picks how dQ is split), `torch` always.
      alibi_slopes: float32 (H,) or (B, H) on query's device, or None: ALiBi (flash-attn 2's),
        score (i, j) of head h gets -alibi_slopes[b, h] * |i + shift - j| added after softcap,
        shift being causal_alignment's diagonal (0 top-left, Sk - Sq bottom-right); masks still
        apply. No gradient flows to the slopes (slopes that require grad raise).

    Validation does not depend on the backend: window entries must be >= 0 or -1, softcap and
    scale finite (softcap >= 0), key_lengths within [0, Sk]. Head dim 0 returns the empty
    output (B, H, Sq, 0), as PyTorch does, without running a kernel.
    """
    if (attn_mask is None and window is None and key_lengths is None and not return_lse
            and softcap == 0.0 and causal_alignment == "top_left" and alibi_slopes is None
            and not torch.compiler.is_compiling()):
        out = _eager.attention(query, key, value, dropout_p, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    _checks.check_tensor("query", query, ndim=(3, 4), dtypes=ATTENTION_DTYPES)
    _checks.check_tensor("key", key, ndim=query.dim(), dtypes=ATTENTION_DTYPES)
    _checks.check_tensor("value", value, ndim=query.dim(), dtypes=ATTENTION_DTYPES)
    _checks.check_same("key", key, "query", query)
    _checks.check_same("value", value, "query", query)
    unbatched = query.dim() == 3
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    b, h, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(f"key/value batch size ({key.shape[0]}, {value.shape[0]}) must match "
                         f"query's ({b})")
    if key.shape[-1] != d:
        raise ValueError(f"key head dim {key.shape[-1]} must equal query head dim {d}")
    if value.shape[1] != hkv or value.shape[2] != sk:
        raise ValueError(f"value shape {tuple(value.shape)} must match key's heads and length "
                         f"{(hkv, sk)}")
    if h != hkv:
        if not enable_gqa:
            raise ValueError(f"query has {h} heads but key/value have {hkv}; pass "
                             f"enable_gqa=True for grouped-query attention")
        if hkv == 0 or h % hkv != 0:
            raise ValueError(f"enable_gqa: query heads ({h}) must be a multiple of key/value "
                             f"heads ({hkv})")
    if causal_alignment not in _attention_ops.ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {_attention_ops.ALIGNMENTS}, "
                         f"got {causal_alignment!r}")
    dropout_p = _finite_float("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    softcap = _finite_float("softcap", softcap, minimum=0.0)
    window_left, window_right = _checks.window_pair(window)
    if scale is not None:
        scale = _finite_float("scale", scale)
    elif d > 0:
        scale = 1.0 / math.sqrt(d)

    mask = attn_mask
    if mask is not None:
        _checks.check_tensor("attn_mask", mask, dtypes=None)
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"attn_mask must be bool or floating, got {mask.dtype}")
        if mask.device != query.device:
            raise ValueError(f"attn_mask is on {mask.device} but query is on {query.device}")
        if mask.is_floating_point() and mask.dtype != query.dtype:
            raise ValueError(f"float attn_mask dtype {mask.dtype} must match query dtype "
                             f"{query.dtype}")
        if unbatched and mask.dim() == 3:
            mask = mask.unsqueeze(0)
        mask = _checks.broadcast_to("attn_mask", mask, (b, h, sq, sk))
    if key_lengths is not None:
        key_lengths = _check_key_lengths(key_lengths, b, sk, query.device)
    alibi_slopes = check_alibi_slopes(alibi_slopes, b, h, query.device)
    if d == 0:
        out, lse = _empty_head_dim_attention(query, key, value, mask, key_lengths,
                                             bool(is_causal), causal_alignment, window_left,
                                             window_right, softcap, alibi_slopes)
        if unbatched:
            out, lse = out.squeeze(0), lse.squeeze(0)
        return (out, lse) if return_lse else out

    out, lse, _, _ = _attention_ops.attend(
        query, key, value, mask=mask, key_lengths=key_lengths, scale=scale,
        causal=bool(is_causal), bottom_right=causal_alignment == "bottom_right",
        window_left=window_left, window_right=window_right, softcap=softcap,
        dropout_p=dropout_p, deterministic=bool(deterministic), alibi_slopes=alibi_slopes)
    if unbatched:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


# -------------------------------------------------------------------------------------- softmax

def softmax(x, dim=-1, *, scale=None, mask=None, causal=False):
    """Fused softmax(x * scale + mask) over `dim`.

    mask: bool (True = keep) or float (added), broadcastable to x; causal masks column j > i,
    where i indexes dim -2 (requires dim=-1). Rows with nothing kept give 0, not NaN.
    """
    if mask is None and not torch.compiler.is_compiling():
        y = _eager.softmax(x, dim, scale, causal)
        if y is not None:
            return y
    _checks.check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    dim = dim % x.dim() if -x.dim() <= dim < x.dim() else None
    if dim is None:
        raise ValueError(f"dim out of range for x with {x.dim()} dimensions")
    if causal and (dim != x.dim() - 1 or x.dim() < 2):
        raise ValueError("softmax: causal=True needs dim=-1 and x with at least 2 dimensions")
    scale = 1.0 if scale is None else float(scale)
    if x.numel() == 0:
        # nothing to normalise (PyTorch returns an empty tensor); the torch backend's
        # reduction would raise on an empty dim, so no backend is asked
        return x * 0.0
    last = dim == x.dim() - 1
    xt = x if last else x.movedim(dim, -1)
    if xt.stride(-1) != 1:
        xt = xt.contiguous()
    if mask is not None:
        _checks.check_tensor("mask", mask, dtypes=None)
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"mask must be bool or floating, got {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        mask = _checks.broadcast_to("mask", mask, x.shape)
        mask = mask if last else mask.movedim(dim, -1)
    backend = _backend.select("softmax", x.device.type, dtype=x.dtype,
                              mask=_checks.mask_kind(mask), causal=bool(causal),
                              device=x.device.type)
    y = _backend.eager_call(_softmax_ops.softmax_op, _softmax_ops.softmax_impl, backend,
                            xt, mask, scale, bool(causal), backend)
    return y if last else y.movedim(-1, dim)


# -------------------------------------------------------------------------------- normalisation

def _norm_rows(name, input, normalized_shape, weight, bias, residual):
    _checks.check_tensor("input", input)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 0 or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"{name}: normalized_shape {shape} does not match the trailing dims of "
                         f"input {tuple(input.shape)}")
    n = math.prod(shape)
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _checks.check_tensor(pname, p)
            if tuple(p.shape) != shape:
                raise ValueError(f"{name}: {pname} must have shape {shape}, got {tuple(p.shape)}")
            if p.device != input.device:
                raise ValueError(f"{name}: {pname} is on {p.device} but input is on "
                                 f"{input.device}")
    # Explicit row count: reshape(-1, 0) is ambiguous when the normalised dims are empty.
    rows = math.prod(input.shape[:input.dim() - len(shape)])
    x2 = input.reshape(rows, n)
    r2 = None
    if residual is not None:
        _checks.check_tensor("residual", residual)
        _checks.check_same("residual", residual, "input", input)
        if residual.shape != input.shape:
            raise ValueError(f"{name}: residual shape {tuple(residual.shape)} must equal input "
                             f"shape {tuple(input.shape)}")
        r2 = residual.reshape(rows, n).contiguous()
    w = weight.reshape(n) if weight is not None else None
    bb = bias.reshape(n) if bias is not None else None
    return x2.contiguous(), w, bb, r2


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None):
    """F.layer_norm on a fused kernel (fp32 statistics).

    With `residual=`, normalises input + residual in the same pass (pre-norm blocks) and returns
    (output, input + residual).
    """
    if residual is None and not torch.compiler.is_compiling():
        y = _eager.layer_norm(input, normalized_shape, weight, bias, eps)
        if y is not None:
            return y
    x2, w, b, r2 = _norm_rows("layer_norm", input, normalized_shape, weight, bias, residual)
    backend = _backend.select(
        "layer_norm", input.device.type, dtype=input.dtype, residual=r2 is not None,
        weight=w is not None, bias=b is not None,
        weight_dtype=None if w is None else w.dtype, device=input.device.type)
    y, _, _, h = _backend.eager_call(_layer_norm_ops.layer_norm_op, _layer_norm_ops.layer_norm_impl, backend,
                                     x2, w, b, r2, float(eps), backend)
    y = y.view(input.shape)
    return y if residual is None else (y, h.view(input.shape))


def rms_norm(input, normalized_shape, weight=None, eps=None, *, residual=None):
    """F.rms_norm on a fused kernel (eps=None means torch.finfo(input.dtype).eps).

    With `residual=`, normalises input + residual in the same pass and returns
    (output, input + residual).
    """
    if residual is None and not torch.compiler.is_compiling():
        y = _eager.rms_norm(input, normalized_shape, weight, eps)
        if y is not None:
            return y
    x2, w, _, r2 = _norm_rows("rms_norm", input, normalized_shape, weight, None, residual)
    eps = torch.finfo(input.dtype).eps if eps is None else float(eps)
    backend = _backend.select(
        "rms_norm", input.device.type, dtype=input.dtype, residual=r2 is not None,
        weight=w is not None, bias=False, weight_dtype=None if w is None else w.dtype,
        device=input.device.type)
    y, _, h = _backend.eager_call(_layer_norm_ops.rms_norm_op, _layer_norm_ops.rms_norm_impl, backend,
                                  x2, w, r2, eps, backend)
    y = y.view(input.shape)
    return y if residual is None else (y, h.view(input.shape))


# --------------------------------------------------------------------------------------- linear

def linear(input, weight, bias=None):
    """`F.linear(input, weight, bias)` = input @ weight.T + bias, with a kernel for the
    skinny products of a decode step. input (..., in_features), weight (out_features,
    in_features), bias (out_features,) or None; one dtype and device.

    On the cpu backend, inputs of at most 16 rows in fp32 (8 in fp16, 4 in bf16; rows = the
    product of input's leading dims, e.g. batch x new tokens) run a C++ kernel that reads the weight once (fp32 accumulation, one
    rounding); a BLAS GEMM packs the weight on every call, which at so few rows costs as much
    as the product itself. With more rows the product is compute-bound and `auto` runs it on
    the torch backend (ATen's GEMM), as it does CUDA tensors (cuBLAS); the record_dispatch()
    log says which. Gradients: ATen's matmuls on every backend.
    """
    if not torch.compiler.is_compiling():
        out = _eager.linear(input, weight, bias)
        if out is not None:
            return out
    _checks.check_tensor("input", input)
    _checks.check_tensor("weight", weight, ndim=2)
    if input.dim() == 0:
        raise ValueError("linear: input must have at least 1 dimension (in_features), got a "
                         "0-d tensor")
    k = input.shape[-1]
    if weight.shape[1] != k:
        raise ValueError(f"linear: weight must have shape (out_features, {k}) for input of "
                         f"shape {tuple(input.shape)}, got {tuple(weight.shape)}")
    _checks.check_same("weight", weight, "input", input)
    if bias is not None:
        _checks.check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"linear: bias must have shape ({weight.shape[0]},) (out_features), "
                             f"got {tuple(bias.shape)}")
        _checks.check_same("bias", bias, "input", input)
    x = input.reshape(math.prod(input.shape[:-1]), k)
    if k > 1 and x.stride(1) != 1:
        x = x.contiguous()
    # The selector caches per case, and under torch.compile takes constants only: the case is
    # whether the rows fit the cpu kernel (a guard when the row count is dynamic, not a SymInt).
    limit = _C_ops.linear_max_rows(input.dtype)
    fits = x.shape[0] <= limit
    rows = limit if fits else limit + 1
    backend = _backend.select("linear", input.device.type, dtype=input.dtype,
                              device=input.device.type, rows=rows)
    y = _backend.eager_call(_linear_ops.linear_op, _linear_ops.linear_impl, backend, x, weight,
                            bias, backend)
    return y.view(*input.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------- swiglu

def swiglu(gate, up):
    """SwiGLU, `F.silu(gate) * up`, fused: one pass over gate and up (fp32 math, one rounding
    to the dtype), and a one-pass backward. gate and up: the same shape, dtype and device; any
    layout (non-contiguous views are copied once). The gated MLP of Llama/Mistral/Qwen is
    `down_proj(swiglu(gate_proj(x), up_proj(x)))`.
    """
    if not torch.compiler.is_compiling():
        out = _eager.swiglu(gate, up)
        if out is not None:
            return out
    _checks.check_tensor("gate", gate)
    _checks.check_tensor("up", up)
    if up.shape != gate.shape:
        raise ValueError(f"swiglu: up must have gate's shape {tuple(gate.shape)}, got "
                         f"{tuple(up.shape)}")
    _checks.check_same("up", up, "gate", gate)
    backend = _backend.select("swiglu", gate.device.type, dtype=gate.dtype,
                              device=gate.device.type)
    return _backend.eager_call(_swiglu_ops.swiglu_op, _swiglu_ops.swiglu_impl, backend,
                               gate.contiguous(), up.contiguous(), backend)


# --------------------------------------------------------------------------------------- rotary

def _rotary_moved(name, x, seq_dim):
    """x viewed as (B, S, ..., D) (batch first, sequence second), always a view of x."""
    _checks.check_tensor(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (S, D), got {tuple(x.shape)}")
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim {seq_dim} is out of range for {name} of shape "
                         f"{tuple(x.shape)}")
    seq = seq_dim % x.dim()
    if seq == x.dim() - 1:
        raise ValueError(f"seq_dim must not be the last (feature) dim of {name}")
    v = x if seq > 0 else x.unsqueeze(0)
    seq = max(seq, 1)
    return v.movedim(seq, 1)                              # (B, S, ..., D)


def _rotary_view(name, x, seq_dim):
    """x as (B, S, H, D): (batch, sequence, merged heads, features). A view of x unless x has
    more than 4 dims whose head dims cannot be merged into one strided dim: then a copy."""
    v = _rotary_moved(name, x, seq_dim)
    if v.dim() == 3:
        v = v.unsqueeze(2)                                # (B, S, 1, D)
    elif v.dim() > 4:
        v = v.flatten(2, -2)                              # copies for non-mergeable strides
    return v


def _has_internal_overlap(x):
    """True when two elements of x share memory (an expanded tensor): ATen's own test, the one
    the extension's in-place kernels apply, so every backend refuses the same tensors. Under
    torch.compile (which cannot trace that call) the test is a stride of 0 on a dim of size
    > 1, which is what an expanded tensor has."""
    check = getattr(torch, "_debug_has_internal_overlap", None)
    if check is not None and not torch.compiler.is_compiling():
        return check(x) == 1                              # 0 no, 1 yes, 2 too hard to tell
    return any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride()))


def _shares_memory_with(v, x):
    """v is a view of x's storage (not a copy). Under torch.compile, which cannot trace the
    storage's address: whether _rotary_view kept x's memory is unknown above 4 dims, so the
    caller writes back (a copy of x's elements onto themselves when v was a view)."""
    if torch.compiler.is_compiling():
        return x.dim() <= 4
    return v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def _check_rotary_tables(x4, cos, sin, offsets, positions=None):
    for pname, t in (("cos", cos), ("sin", sin)):
        _checks.check_tensor(pname, t, ndim=2)
        if t.device != x4.device:
            raise ValueError(f"{pname} is on {t.device} but the input is on {x4.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{pname} requires grad, but apply_rotary treats cos/sin as "
                             f"constants; pass {pname}.detach()")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    rot = 2 * cos.shape[1]
    if rot == 0 or rot > x4.shape[-1]:
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} rotate {rot} features but the "
                         f"head dim is {x4.shape[-1]} (need 0 < 2 * cos.shape[1] <= head dim)")
    b, s = x4.shape[0], x4.shape[1]
    if positions is not None:
        if offsets is not None:
            raise ValueError("pass offsets or positions, not both")
        _checks.check_tensor("positions", positions, dtypes=(torch.int32, torch.int64))
        if positions.dim() == 1 and b == 1:
            positions = positions.unsqueeze(0)
        if positions.dim() != 2 or positions.shape[1] != s or positions.shape[0] not in (1, b):
            raise ValueError(f"positions must have shape ({b}, {s}) (or (1, {s})), got "
                             f"{tuple(positions.shape)}")
        positions = positions.to(x4.device).expand(b, s)
        if positions.numel() and not torch.compiler.is_compiling() and (
                int(positions.min()) < 0 or int(positions.max()) >= cos.shape[0]):
            raise ValueError(f"positions must lie in [0, {cos.shape[0]}) (the cos/sin cache), "
                             f"got [{int(positions.min())}, {int(positions.max())}]")
        return 2 * cos.shape[1], None, positions
    if offsets is not None:
        _checks.check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int32, torch.int64))
        if offsets.shape[0] != b:
            raise ValueError(f"offsets must have shape ({b},), got {tuple(offsets.shape)}")
        offsets = offsets.to(x4.device)
        # value checks need a host sync: skipped under torch.compile, as for positions (the
        # C++ op checks again; the Triton kernel never reads outside the cache)
        if offsets.numel() and not torch.compiler.is_compiling() and (
                int(offsets.min()) < 0 or int(offsets.max()) + s > cos.shape[0]):
            raise ValueError(f"offsets + sequence length exceed the cos/sin cache of "
                             f"{cos.shape[0]} positions")
    elif s > cos.shape[0]:
        raise ValueError(f"sequence length {s} exceeds the cos/sin cache of {cos.shape[0]} "
                         f"positions")
    return rot, offsets, None


def _rotary_backend(x4, rot, interleaved, offsets, inplace, positions=None):
    extra = {} if positions is None else {"positions": True}
    name = _backend.select("rotary", x4.device.type, dtype=x4.dtype, head_dim=x4.shape[-1],
                              rot_dim=rot, interleaved=bool(interleaved),
                              offsets=offsets is not None, inplace=inplace,
                              device=x4.device.type, **extra)
    return name


def apply_rotary(x, cos, sin, *, interleaved=False, seq_dim=-2, offsets=None, inplace=False,
                 positions=None):
    """Rotary position embedding on the first R = 2 * cos.shape[1] features of x.

    x (..., S, ..., D) with the sequence at seq_dim and the batch at dim 0 (for `offsets`);
    cos, sin (S_cache, R/2), from fastattn.rotary_cache. interleaved=False is GPT-NeoX style
    (rotate halves), True is GPT-J style (adjacent pairs). offsets (B,): per-batch position
    offsets (decoding with a KV cache). positions (B, S) int: the cache row of every token
    (Hugging Face's position_ids: left-padded batches, packed sequences); instead of offsets.
    inplace=True writes into x (no autograd) and returns x;
    x must not overlap itself (an expanded tensor). Any strided layout of up to 4 dims is read
    and written without a copy; with more dims whose head dims cannot be merged into one
    strided dim, x is rotated in a contiguous copy (in place there too) that is written back.
    """
    if not inplace and offsets is None and not torch.compiler.is_compiling():
        y = _eager.rotary(x, cos, sin, interleaved, seq_dim, positions)
        if y is not None:
            return y
    x4 = _rotary_view("x", x, seq_dim)
    rot, offsets, positions = _check_rotary_tables(x4, cos, sin, offsets, positions)
    pos_arg = () if positions is None else (positions,)
    if inplace:
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError("apply_rotary(inplace=True) does not support autograd; x requires "
                             "grad")
        if _has_internal_overlap(x):
            raise ValueError(f"apply_rotary(inplace=True): x of shape {tuple(x.shape)} and "
                             f"strides {x.stride()} overlaps itself (an expanded tensor?); "
                             f"rotate x.clone() or use inplace=False")
    backend = _rotary_backend(x4, rot, interleaved, offsets, inplace, positions)
    if inplace:
        _backend.eager_call(_rotary_ops.rotary_inplace_op, _rotary_ops.rotary_inplace_impl,
                            backend, x4, cos, sin, offsets, bool(interleaved), False, backend,
                            *pos_arg)
        if not _shares_memory_with(x4, x):
            # the head dims did not merge and x4 is a contiguous copy: write it back into x
            moved = _rotary_moved("x", x, seq_dim)        # (B, S, ..., D), a view of x
            moved.copy_(x4.view(moved.shape))
        return x
    y4 = _backend.eager_call(_rotary_ops.rotary_op, _rotary_ops.rotary_impl, backend,
                             x4, cos, sin, offsets, bool(interleaved), False, backend, *pos_arg)
    return _undo_rotary_view(y4, x, seq_dim)


def _undo_rotary_view(y4, x, seq_dim):
    seq = seq_dim % x.dim()
    shape = list(x.shape) if seq > 0 else [1] + list(x.shape)
    seq = max(seq, 1)
    moved = [shape[0], shape[seq]] + [s for i, s in enumerate(shape) if i not in (0, seq)]
    y = y4.reshape(moved).movedim(1, seq)
    return y if seq_dim % x.dim() > 0 else y.squeeze(0)


def apply_rotary_qk(q, k, cos, sin, *, interleaved=False, seq_dim=-2, offsets=None,
                    positions=None):
    """Rotate q and k; same arguments as apply_rotary. One kernel launch for both on the triton
    backend; the cpu and cuda backends launch once per tensor."""
    if offsets is None and not torch.compiler.is_compiling():
        qk = _eager.rotary_qk(q, k, cos, sin, interleaved, seq_dim, positions)
        if qk is not None:
            return qk
    q4, k4 = _rotary_view("q", q, seq_dim), _rotary_view("k", k, seq_dim)
    if q4.shape[:2] != k4.shape[:2] or q4.shape[-1] != k4.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, sequence "
                         f"and head dim")
    _checks.check_same("k", k, "q", q)
    rot, offsets, positions = _check_rotary_tables(q4, cos, sin, offsets, positions)
    backend = _rotary_backend(q4, rot, interleaved, offsets, False, positions)
    pos_arg = () if positions is None else (positions,)
    qo, ko = _backend.eager_call(_rotary_ops.rotary_qk_op, _rotary_ops.rotary_qk_impl, backend,
                                 q4, k4, cos, sin, offsets, bool(interleaved), False, backend,
                                 *pos_arg)
    return _undo_rotary_view(qo, q, seq_dim), _undo_rotary_view(ko, k, seq_dim)


def rotary_cache(seq_len, rot_dim, *, base=10000.0, scaling=None, device=None,
                 dtype=torch.float32):
    """cos, sin tables (seq_len, rot_dim // 2) for apply_rotary.

    scaling: None, ("linear", factor) (position interpolation) or ("ntk", factor) (NTK-aware
    base scaling).
    """
    from .reference import rotary_cache as _cache
    return _cache(seq_len, rot_dim, base=base, scaling=scaling, device=device, dtype=dtype)
