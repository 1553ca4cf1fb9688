"""The `cpu` and `cuda` backends: docs/backend-contract.md over torch.ops.fastattn_kernels.* of the
compiled extension fastattn._C.

Imports cleanly without the extension (every function then raises, and unsupported() says why).
Also registers fake (meta) implementations of the C++ ops so torch.compile can trace them.
"""

import functools

import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.fastattn_kernels.*)
    _IMPORT_ERROR = None
except ImportError as exc:  # not built: the ops layer falls back to another backend
    _IMPORT_ERROR = str(exc)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The kernel ops behind each fastattn op: `{op}_forward` by convention (a new op needs no entry
# here); the exceptions are listed.
_KERNEL_OPS = {
    "rms_norm": ("rms_norm_forward", "rms_norm_backward"),
    "layer_norm": ("layer_norm_forward", "layer_norm_backward"),
    "rotary": ("rotary_forward", "rotary_forward_out", "rotary_forward_inplace"),
    "rotary_qk": ("rotary_forward", "rotary_forward_out", "rotary_forward_inplace"),
}


# The kernel ops that take alibi_slopes (a float32 (B, H) tensor or None), per fastattn op.
_ALIBI_KERNEL_OPS = {
    "attention": ("attention_forward", "attention_backward"),
    "varlen_attention": ("varlen_attention_forward", "varlen_attention_backward"),
    "kvcache_attention": ("kvcache_attention_forward",),
}


def _kernel_ops(op):
    return _KERNEL_OPS.get(op, (f"{op}_forward",))


@functools.lru_cache(maxsize=None)
def _has_cuda_kernel(op):
    """Whether fastattn._C registered a CUDA implementation of op's kernels (the dispatcher
    knows; no list of CUDA-capable ops to keep in step)."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn_kernels::{name}", "CUDA")
               for name in _kernel_ops(op))


def _has_op(name):
    return _IMPORT_ERROR is None and _registered(name)


@functools.lru_cache(maxsize=None)
def _registered(name):  # ops are never unregistered; the lookup is slow on every kernel call
    return hasattr(torch.ops.fastattn_kernels, name)


def _ops():
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"fastattn._C is not available ({_IMPORT_ERROR})")
    return torch.ops.fastattn_kernels


@functools.lru_cache(maxsize=None)
def _rotary_takes_positions():
    schema = torch.ops.fastattn_kernels.rotary_forward.default._schema
    return any(a.name == "positions" for a in schema.arguments)


@functools.lru_cache(maxsize=None)
def _takes_alibi(op):
    """Whether op's kernel schemas have the alibi_slopes argument (builds before it do not)."""
    return all(any(a.name == "alibi_slopes"
                   for a in getattr(torch.ops.fastattn_kernels, n).default._schema.arguments)
               for n in _ALIBI_KERNEL_OPS[op])


def _alibi(slopes):
    """The trailing alibi_slopes argument of a kernel call: omitted when None, so a build
    without ALiBi still runs every other case."""
    return () if slopes is None else (slopes,)


def _cuda_compiled():
    if not _has_op("build_info"):
        return False
    import json
    return bool(json.loads(torch.ops.fastattn_kernels.build_info()).get("cuda_compiled", False))


def unsupported(op, **case):
    """Why this backend cannot run `op` for `case` (keywords as the ops layer passes them), or
    None when it can."""
    if _IMPORT_ERROR is not None:
        return f"fastattn._C is not built ({_IMPORT_ERROR})"
    names = _kernel_ops(op)
    if not all(_has_op(n) for n in names):
        return f"fastattn._C was built without the {op} kernels"
    dtype = case.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        return f"dtype {dtype} (kernels take float32, float16 and bfloat16)"
    device = case.get("device")
    if device not in (None, "cpu", "cuda"):
        return f"no kernels for device {device}"
    if device == "cuda":
        if not _cuda_compiled():
            return "fastattn._C was built without CUDA kernels"
        if op == "linear":
            return "no CUDA linear kernel (cuBLAS, the torch backend, is the GEMM for CUDA)"
        if not _has_cuda_kernel(op):
            return f"no CUDA {op} kernel in fastattn._C (use the triton backend)"
        if case.get("alibi"):  # ALiBi is in the CPU kernels only
            return "alibi_slopes (the CUDA kernels take no ALiBi; use the triton backend)"
    if (op == "attention" and case.get("dropout_p", 0.0) > 0
            and not _has_op("attention_dropout_mask")):
        return "fastattn._C was built without attention dropout (rebuild it)"
    if case.get("alibi"):
        if op not in _ALIBI_KERNEL_OPS:
            return f"alibi_slopes (no ALiBi in the {op} kernels)"
        if not _takes_alibi(op):
            return "fastattn._C was built without ALiBi (rebuild it)"
    if op == "linear" and case.get("rows", 0) > linear_max_rows(dtype):
        return (f"more than {linear_max_rows(dtype)} rows of {dtype}: ATen's GEMM (the torch "
                "backend) is the kernel for it")
    if op == "rotary" and case.get("positions") and not _rotary_takes_positions():
        return "fastattn._C was built without rotary positions (rebuild it)"
    if op in ("attention", "varlen_attention") and case.get("v_head_dim", case.get("head_dim")) != case.get("head_dim"):
        return "v head dim != q/k head dim (the CPU kernels take one head dim)"
    return None


# ------------------------------------------------------------------ attention

def _attention_args(mask, scale, causal, alignment, window_left, window_right, softcap,
                    key_lengths):
    return (mask, float(scale), bool(causal), alignment == "bottom_right", int(window_left),
            int(window_right), float(softcap), key_lengths)


def _dropout_args(dropout_p, seed, offset):
    return float(dropout_p), int(seed), int(offset)


def dropout_keep_mask(shape, dropout_p, seed, offset, device):
    """Bool keep-mask (B, H, Sq, Sk) that attention_forward/backward use for (seed, offset)."""
    b, h, sq, sk = (int(s) for s in shape)
    keep = _ops().attention_dropout_mask(b, h, sq, sk, *_dropout_args(dropout_p, seed, offset))
    return keep.to(device)


def attention_forward(q, k, v, *, mask, scale, causal, alignment, window_left, window_right,
                      softcap, key_lengths, dropout_p, seed, offset, alibi_slopes=None):
    return _ops().attention_forward(q, k, v, *_attention_args(
        mask, scale, causal, alignment, window_left, window_right, softcap, key_lengths),
        *_dropout_args(dropout_p, seed, offset), *_alibi(alibi_slopes))


def attention_backward(dout, q, k, v, out, lse, *, mask, scale, causal, alignment, window_left,
                       window_right, softcap, key_lengths, dropout_p, seed, offset,
                       deterministic, mask_needs_grad, alibi_slopes=None):
    # The CPU backward uses no atomics: it is deterministic whatever `deterministic` says.
    dq, dk, dv, dmask = _ops().attention_backward(dout, q, k, v, out, lse, *_attention_args(
        mask, scale, causal, alignment, window_left, window_right, softcap, key_lengths),
        bool(mask_needs_grad), *_dropout_args(dropout_p, seed, offset), *_alibi(alibi_slopes))
    return dq, dk, dv, (dmask if mask_needs_grad else None)


def attention_weights_forward(q, k, lse, *, mask, key_lengths, scale, causal, alignment,
                              window_left, window_right, softcap, average):
    return _ops().attention_weights_forward(
        q, k, lse, mask, float(scale), bool(causal), alignment == "bottom_right",
        int(window_left), int(window_right), float(softcap), key_lengths, bool(average))


# ------------------------------------------------------------------ varlen attention

def varlen_dropout_keep_mask(batch, heads, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset,
                             device):
    """Keep-mask (B, H, max_q, max_k) of varlen_forward/backward; sequence b uses
    [b, :, :len_q, :len_k] (the kernels index the RNG as the dense (B, H, max_q, max_k) case)."""
    return dropout_keep_mask((batch, heads, max_seqlen_q, max_seqlen_k), dropout_p, seed, offset,
                             device)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale,
                   causal, window_left, window_right, softcap, dropout_p, seed, offset,
                   alibi_slopes=None):
    return _ops().varlen_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), float(scale),
        bool(causal), int(window_left), int(window_right), float(softcap),
        *_dropout_args(dropout_p, seed, offset), *_alibi(alibi_slopes))


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, *, scale, causal, window_left, window_right, softcap, dropout_p,
                    seed, offset, deterministic, alibi_slopes=None):
    # No atomics in the CPU backward: deterministic whatever `deterministic` says.
    return _ops().varlen_attention_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
        int(max_seqlen_k), float(scale), bool(causal), int(window_left), int(window_right),
        float(softcap), *_dropout_args(dropout_p, seed, offset), *_alibi(alibi_slopes))

# ------------------------------------------------------------------ merge_attention_states

def merge_attention_states(out_a, lse_a, out_b, lse_b):
    return _ops().merge_attention_states_forward(out_a, lse_a, out_b, lse_b)


# ------------------------------------------------------------------ softmax

def softmax_forward(x, *, scale, mask, causal):
    return _ops().softmax_forward(x, 1.0 if scale is None else float(scale), mask, bool(causal))


def softmax_backward(dy, y, *, scale):
    return _ops().softmax_backward(dy, y, 1.0 if scale is None else float(scale))


# ------------------------------------------------------------------ layer norm / rms norm

def layer_norm_forward(x, weight, bias, eps, residual):
    y, mean, rstd, h = _ops().layer_norm_forward(x, weight, bias, float(eps), residual)
    return y, mean, rstd, (h if residual is not None else None)


def layer_norm_backward(dy, h, weight, bias, mean, rstd, dh_extra):
    dx, dw, db = _ops().layer_norm_backward(dy, h, weight, bias, mean, rstd, dh_extra)
    return dx, (dw if weight is not None else None), (db if bias is not None else None)


def rms_norm_forward(x, weight, eps, residual):
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    y, rstd, h = _ops().rms_norm_forward(x, weight, float(eps), residual)
    return y, rstd, (h if residual is not None else None)


def rms_norm_backward(dy, h, weight, rstd, dh_extra):
    dx, dw = _ops().rms_norm_backward(dy, h, weight, rstd, dh_extra)
    return dx, (dw if weight is not None else None)


# ------------------------------------------------------------------ rotary

def _same_view(a, b):
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def rotary_forward(x, cos, sin, *, interleaved, offsets, conjugate, out=None, positions=None):
    ops = _ops()
    extra = () if positions is None else (positions,)   # old builds lack the argument
    if out is None:
        return ops.rotary_forward(x, cos, sin, bool(interleaved), offsets, bool(conjugate),
                                  *extra)
    if _same_view(out, x):
        ops.rotary_forward_inplace(x, cos, sin, bool(interleaved), offsets, bool(conjugate),
                                   *extra)
    else:
        ops.rotary_forward_out(x, cos, sin, bool(interleaved), offsets, bool(conjugate), out,
                               *extra)
    return out


def rotary_forward_qk(q, k, cos, sin, *, interleaved, offsets, conjugate, q_out=None,
                      k_out=None, positions=None):
    # Two launches of the same kernel (q and k differ in head count and strides).
    q_out = rotary_forward(q, cos, sin, interleaved=interleaved, offsets=offsets,
                           conjugate=conjugate, out=q_out, positions=positions)
    k_out = rotary_forward(k, cos, sin, interleaved=interleaved, offsets=offsets,
                           conjugate=conjugate, out=k_out, positions=positions)
    return q_out, k_out


# ------------------------------------------------------------------ swiglu

def swiglu_forward(gate, up):
    return _ops().swiglu_forward(gate, up)


def swiglu_backward(dy, gate, up):
    return _ops().swiglu_backward(dy, gate, up)


# ------------------------------------------------------------------ linear

# The most rows (batch x tokens) the skinny-GEMM kernel takes, per dtype: up to here reading
# the weight once beats ATen's GEMM (MKL packs the weight on every call); past it the product
# turns compute-bound and `auto` gives it to the torch backend. fp16/bf16 weights are widened
# to fp32 in the kernel on every row pass, while ATen's bf16 GEMM runs on AMX/VNNI units, so
# their limits are lower. Measured on DRAM-resident weights, 2 threads (1376x512 and
# 4096x4096): fp32 1.0-1.9x up to 16 rows; fp16 1.3-3.0x up to 8, ~0.9x at 12; bf16 1.1-1.8x
# up to 4, 0.7-1.1x at 6 (`python -m benchmarks --ops linear`).
LINEAR_MAX_ROWS = {torch.float32: 16, torch.float16: 8, torch.bfloat16: 4}


def linear_max_rows(dtype):
    """The cpu kernel's row limit for `dtype` (0: a dtype it does not take)."""
    return LINEAR_MAX_ROWS.get(dtype, 0)


def linear_forward(x, weight, bias):
    return _ops().linear_forward(x, weight, bias)


# ------------------------------------------------------------------ kvcache attention

def kvcache_attention_forward(q, k_cache, v_cache, *, cache_seqlens, seqlen_new, block_table,
                              cache_batch_idx, scale, causal, window_left, window_right,
                              softcap, alibi_slopes=None):
    return _ops().kvcache_attention_forward(
        q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, int(seqlen_new),
        float(scale), bool(causal), int(window_left), int(window_right), float(softcap),
        *_alibi(alibi_slopes))
