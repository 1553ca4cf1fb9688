"""Packed variable-length attention as torch.library custom ops (autograd + fake impls).

`fastattn::varlen_attention` (forward: out (total_q, H, Dv), lse (H, total_q) fp32) and
`fastattn::varlen_attention_grad` (backward: dq, dk, dv) take the backend chosen by the caller,
like fastattn::attention (ops/attention.py). max_seqlen_q/k are Python ints (they size the
kernels' grids), so torch.compile traces the op with fullgraph=True. Under torch.compile on the
triton backend their fastattn_triton twins (ops/_triton.py) run instead. alibi_slopes (last
argument): None or a contiguous fp32 (B, H) tensor, no gradient (as in ops/attention.py).
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..kernels import _compat as _kernels_compat
from . import _triton
from .attention import alibi_kwargs, rng_kwargs


def check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q,
                            max_seqlen_k):
    """Value checks of the offsets (one host synchronisation for CUDA tensors): start at 0,
    non-decreasing, end at the token count, no sequence longer than max_seqlen."""
    for name, cu, total, mx, mname in (
            ("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")):
        c = cu.detach().to("cpu", torch.int64)
        if c[0].item() != 0:
            raise ValueError(f"{name}: must start at 0, got {c[0].item()}")
        lens = c[1:] - c[:-1]
        if lens.numel() and lens.min().item() < 0:
            b = int(torch.nonzero(lens < 0)[0].item())
            raise ValueError(f"{name}: must be non-decreasing, but {name}[{b + 1}] = "
                             f"{c[b + 1].item()} < {name}[{b}] = {c[b].item()}")
        if c[-1].item() != total:
            raise ValueError(f"{name}: last entry {c[-1].item()} must equal the number of "
                             f"tokens ({total})")
        if lens.numel() and lens.max().item() > mx:
            raise ValueError(f"{mname}: {mx} is smaller than the longest sequence of {name} "
                             f"({lens.max().item()})")


@torch.library.custom_op(f"{_triton.NAMESPACE}::varlen_checked_offsets", mutates_args=())
def checked_offsets_op(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int, total_k: int,
                       max_seqlen_q: int, max_seqlen_k: int) -> tuple[Tensor, Tensor]:
    """check_cu_seqlens_values when the graph runs, then copies of the offsets (the kernels read
    the copies, so the check runs before them and is not dropped as unused). How a traced
    fastattn_triton twin checks the values: it cannot read tensors while it is traced."""
    check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q,
                            max_seqlen_k)
    return cu_seqlens_q.clone(), cu_seqlens_k.clone()


@checked_offsets_op.register_fake
def _(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k):
    return torch.empty_like(cu_seqlens_q), torch.empty_like(cu_seqlens_k)


def _window(window_left, window_right):
    return dict(window_left=window_left, window_right=window_right)


def varlen_attention_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                          cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          rng: Optional[Tensor], scale: float, causal: bool, window_left: int,
                          window_right: int, softcap: float, dropout_p: float,
                          deterministic: bool, check_values: bool,
                          backend: str, alibi_slopes: Optional[Tensor] = None
                          ) -> tuple[Tensor, Tensor]:
    """out (total_q, H, Dv), lse (H, total_q) fp32. `deterministic` is for the backward.
    check_values: run check_cu_seqlens_values here (the public function asks for it when it
    could not run them itself, i.e. under torch.compile)."""
    _backend.log_dispatch("varlen_attention", backend)
    if check_values and _kernels_compat.tracing_triton_op():     # a traced twin: at run time
        cu_seqlens_q, cu_seqlens_k = checked_offsets_op(cu_seqlens_q, cu_seqlens_k, q.shape[0],
                                                        k.shape[0], max_seqlen_q, max_seqlen_k)
    elif check_values:
        check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0],
                                max_seqlen_q, max_seqlen_k)
    impl = _backend.backend_module(backend, "varlen_attention")
    out, lse = impl.varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
        causal=causal, **_window(window_left, window_right), softcap=softcap,
        dropout_p=dropout_p, **rng_kwargs(rng), **alibi_kwargs(alibi_slopes))
    return out.contiguous(), lse.contiguous()


varlen_attention_op = torch.library.custom_op("fastattn::varlen_attention", varlen_attention_impl,
                                              mutates_args=())


@varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng, scale, causal,
      window_left, window_right, softcap, dropout_p, deterministic, check_values, backend,
      alibi_slopes=None):
    total_q, h, _ = q.shape
    return q.new_empty(total_q, h, v.shape[-1]), q.new_empty(h, total_q, dtype=torch.float32)


def varlen_attention_backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                   lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                   max_seqlen_q: int, max_seqlen_k: int, rng: Optional[Tensor],
                                   scale: float, causal: bool, window_left: int,
                                   window_right: int, softcap: float, dropout_p: float,
                                   deterministic: bool, backend: str,
                                   alibi_slopes: Optional[Tensor] = None
                                   ) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the inputs' shapes and dtypes."""
    impl = _backend.backend_module(backend, "varlen_attention")
    dq, dk, dv = impl.varlen_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale=scale, causal=causal, **_window(window_left, window_right), softcap=softcap,
        dropout_p=dropout_p, **rng_kwargs(rng), deterministic=deterministic,
        **alibi_kwargs(alibi_slopes))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


varlen_attention_backward_op = torch.library.custom_op(
    "fastattn::varlen_attention_backward", varlen_attention_backward_impl, mutates_args=())


@varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng,
      scale, causal, window_left, window_right, softcap, dropout_p, deterministic, backend,
      alibi_slopes=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng, scale, causal,
     window_left, window_right, softcap, dropout_p, deterministic, check_values,
     backend, alibi_slopes) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng, alibi_slopes)
    ctx.args = (max_seqlen_q, max_seqlen_k)
    ctx.kwargs = (scale, causal, window_left, window_right, softcap, dropout_p, deterministic,
                  backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng, alibi_slopes = ctx.saved_tensors
    backward_op = _triton.for_ctx(varlen_attention_backward_op, ctx)
    dq, dk, dv = backward_op(dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                             *ctx.args, rng, *ctx.kwargs, alibi_slopes)
    return (dq, dk, dv) + (None,) * 15


torch.library.register_autograd("fastattn::varlen_attention", _backward,
                                setup_context=_setup_context)

# torch.compile on the triton backend: the same bodies as fastattn_triton ops (ops/_triton.py)
_triton.register(varlen_attention_backward_op, varlen_attention_backward_impl)
_triton.register(varlen_attention_op, varlen_attention_impl, setup_context=_setup_context,
                 backward=_backward)
