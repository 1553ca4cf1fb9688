"""Linear, y = x @ weight^T + bias, as custom op `fastattn::linear`.

x arrives 2-D (rows, in_features) with unit column stride, weight (out_features, in_features),
bias (out_features,) or None, one dtype and device (fastattn.linear makes them so). The
backward is ATen's matmuls on every backend (the kernels are for inference-sized inputs: the
gradients of a linear layer are two GEMMs that BLAS already runs at its best).
"""

import torch
from torch import Tensor

from .. import _backend


def linear_impl(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    _backend.log_dispatch("linear", backend)
    impl = _backend.backend_module(backend, "linear")
    return impl.linear_forward(x, weight, bias).contiguous()


linear_op = torch.library.custom_op("fastattn::linear", linear_impl, mutates_args=())


@linear_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = dy @ weight if ctx.needs_input_grad[0] else None
    dweight = dy.t() @ x if ctx.needs_input_grad[1] else None
    dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dweight, dbias, None


torch.library.register_autograd("fastattn::linear", _backward, setup_context=_setup_context)
