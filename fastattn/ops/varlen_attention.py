"""Packed variable-length attention as torch.library custom ops (autograd + fake impls).

`fastattn::varlen_attention` (forward: out (total_q, H, Dv), lse (H, total_q) fp32) and
`fastattn::varlen_attention_grad` (backward: dq, dk, dv) take the backend chosen by the caller,
like fastattn::attention (ops/attention.py). max_seqlen_q/k are Python ints (they size the
kernels' grids), so torch.compile traces the op with fullgraph=True.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _backend


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


def _window(window_left, window_right):
    return dict(window_left=window_left, window_right=window_right)


def varlen_attention_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                          cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          rng: Optional[Tensor], scale: float, causal: bool, window_left: int,
                          window_right: int, softcap: float, dropout_p: float,
                          deterministic: bool, check_values: bool,
                          backend: str) -> tuple[Tensor, Tensor]:
    """out (total_q, H, Dv), lse (H, total_q) fp32. `deterministic` is for the backward.
    check_values: run check_cu_seqlens_values here (the public function asks for it when it
    could not run them itself, i.e. under torch.compile)."""
    _backend.log_dispatch("varlen_attention", backend)
    if check_values:
        check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0],
                                max_seqlen_q, max_seqlen_k)
    seed, offset = rng.tolist() if rng is not None else (0, 0)
    impl = _backend.backend_module(backend, "varlen_attention")
    out, lse = impl.varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
        causal=causal, **_window(window_left, window_right), softcap=softcap,
        dropout_p=dropout_p, seed=seed, offset=offset)
    return out.contiguous(), lse.contiguous()


varlen_attention_op = torch.library.custom_op("fastattn::varlen_attention", varlen_attention_impl,
                                              mutates_args=())


@varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng, scale, causal,
      window_left, window_right, softcap, dropout_p, deterministic, check_values, backend):
    total_q, h, _ = q.shape
    return q.new_empty(total_q, h, v.shape[-1]), q.new_empty(h, total_q, dtype=torch.float32)


@torch.library.custom_op("fastattn::varlen_attention_backward", mutates_args=())
def varlen_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, rng: Optional[Tensor],
                             scale: float, causal: bool, window_left: int, window_right: int,
                             softcap: float, dropout_p: float, deterministic: bool,
                             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the inputs' shapes and dtypes."""
    seed, offset = rng.tolist() if rng is not None else (0, 0)
    impl = _backend.backend_module(backend, "varlen_attention")
    dq, dk, dv = impl.varlen_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale=scale, causal=causal, **_window(window_left, window_right), softcap=softcap,
        dropout_p=dropout_p, seed=seed, offset=offset, deterministic=deterministic)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng,
      scale, causal, window_left, window_right, softcap, dropout_p, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng, scale, causal,
     window_left, window_right, softcap, dropout_p, deterministic, check_values,
     backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng)
    ctx.args = (max_seqlen_q, max_seqlen_k)
    ctx.kwargs = (scale, causal, window_left, window_right, softcap, dropout_p, deterministic,
                  backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward_op(dout.contiguous(), q, k, v, out, lse, cu_seqlens_q,
                                          cu_seqlens_k, *ctx.args, rng, *ctx.kwargs)
    return (dq, dk, dv) + (None,) * 14


torch.library.register_autograd("fastattn::varlen_attention", _backward,
                                setup_context=_setup_context)
