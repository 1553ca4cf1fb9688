"""SwiGLU, silu(gate) * up, as custom ops `fastattn::swiglu` / `fastattn::swiglu_backward`.

gate and up arrive with one shape, dtype and device, contiguous (fastattn.swiglu makes them so).
"""

import torch
from torch import Tensor

from .. import _backend
from . import _triton


def swiglu_impl(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    _backend.log_dispatch("swiglu", backend)
    impl = _backend.backend_module(backend, "swiglu")
    return impl.swiglu_forward(gate, up).contiguous()


swiglu_op = torch.library.custom_op("fastattn::swiglu", swiglu_impl, mutates_args=())


@swiglu_op.register_fake
def _(gate, up, backend):
    return gate.new_empty(gate.shape)


def swiglu_backward_impl(dy: Tensor, gate: Tensor, up: Tensor,
                         backend: str) -> tuple[Tensor, Tensor]:
    impl = _backend.backend_module(backend, "swiglu")
    dgate, dup = impl.swiglu_backward(dy, gate, up)
    return dgate.contiguous(), dup.contiguous()


swiglu_backward_op = torch.library.custom_op("fastattn::swiglu_backward", swiglu_backward_impl,
                                             mutates_args=())


@swiglu_backward_op.register_fake
def _(dy, gate, up, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _triton.for_ctx(swiglu_backward_op, ctx)(dy.contiguous(), gate, up,
                                                           ctx.backend)
    return dgate, dup, None


torch.library.register_autograd("fastattn::swiglu", _backward, setup_context=_setup_context)

# torch.compile on the triton backend: the same bodies as fastattn_triton ops (ops/_triton.py)
_triton.register(swiglu_backward_op, swiglu_backward_impl)
_triton.register(swiglu_op, swiglu_impl, setup_context=_setup_context, backward=_backward)
