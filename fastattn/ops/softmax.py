"""Softmax over the last dim as custom ops `fastattn::softmax` / `fastattn::softmax_grad`."""

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _triton


def softmax_impl(x: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                 backend: str) -> Tensor:
    _backend.log_dispatch("softmax", backend)
    impl = _backend.backend_module(backend, "softmax")
    return impl.softmax_forward(x, scale=scale, mask=mask, causal=causal).contiguous()


softmax_op = torch.library.custom_op("fastattn::softmax", softmax_impl, mutates_args=())


@softmax_op.register_fake
def _(x, mask, scale, causal, backend):
    return x.new_empty(x.shape)


def softmax_backward_impl(dy: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    impl = _backend.backend_module(backend, "softmax")
    return impl.softmax_backward(dy, y, scale=scale).contiguous()


softmax_backward_op = torch.library.custom_op("fastattn::softmax_backward",
                                              softmax_backward_impl, mutates_args=())


@softmax_backward_op.register_fake
def _(dy, y, scale, backend):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    x, mask, scale, causal, backend = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.backend = scale, backend
    ctx.mask_needs_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[1]


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    backward_op = _triton.for_ctx(softmax_backward_op, ctx)
    if not ctx.mask_needs_grad:
        return backward_op(dy.contiguous(), y, ctx.scale, ctx.backend), None, None, None, None
    # s = x * scale + mask: the mask receives dS, x receives scale * dS.
    ds = backward_op(dy.contiguous(), y, 1.0, ctx.backend)
    return ds * ctx.scale, ds, None, None, None


torch.library.register_autograd("fastattn::softmax", _backward, setup_context=_setup_context)

# torch.compile on the triton backend: the same bodies as fastattn_triton ops (ops/_triton.py)
_triton.register(softmax_backward_op, softmax_backward_impl)
_triton.register(softmax_op, softmax_impl, setup_context=_setup_context, backward=_backward)
