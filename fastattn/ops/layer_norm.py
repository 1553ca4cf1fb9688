"""LayerNorm and RMSNorm (with optional fused residual add) as custom ops with autograd.

Inputs arrive flattened to (M, N) rows. Each forward returns the pre-norm sum `h`
(x + residual) as an extra output when a residual is given, else an empty tensor: custom ops
cannot return an alias of an input or None.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _triton


def _empty(like):
    return like.new_empty(0)


# ------------------------------------------------------------------ layer norm

def layer_norm_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor], eps: float,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _backend.log_dispatch("layer_norm", backend)
    impl = _backend.backend_module(backend, "layer_norm")
    y, mean, rstd, h = impl.layer_norm_forward(x, weight, bias, eps, residual)
    return y, mean, rstd, (_empty(x) if h is None else h)


layer_norm_op = torch.library.custom_op("fastattn::layer_norm", layer_norm_impl,
                                        mutates_args=())


@layer_norm_op.register_fake
def _(x, weight, bias, residual, eps, backend):
    m = x.shape[0]
    stats = x.new_empty(m, dtype=torch.float32)
    return (torch.empty_like(x), stats, torch.empty_like(stats),
            _empty(x) if residual is None else torch.empty_like(x))


def layer_norm_backward_impl(dy: Tensor, h: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                             dh_extra: Optional[Tensor],
                             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backend.backend_module(backend, "layer_norm")
    dx, dw, db = impl.layer_norm_backward(dy, h, weight, bias, mean, rstd, dh_extra)
    return dx, (_empty(h) if dw is None else dw), (_empty(h) if db is None else db)


layer_norm_backward_op = torch.library.custom_op("fastattn::layer_norm_backward",
                                                 layer_norm_backward_impl, mutates_args=())


@layer_norm_backward_op.register_fake
def _(dy, h, weight, bias, mean, rstd, dh_extra, backend):
    return (torch.empty_like(h), _empty(h) if weight is None else torch.empty_like(weight),
            _empty(h) if bias is None else torch.empty_like(bias))


def _ln_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, backend = inputs
    y, mean, rstd, h = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)
    ctx.backend = backend
    ctx.mark_non_differentiable(mean, rstd)


def _ln_backward(ctx, dy, dmean, drstd, dh):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    dh_extra = dh.contiguous() if ctx.has_residual and dh is not None else None
    dx, dw, db = _triton.for_ctx(layer_norm_backward_op, ctx)(
        dy.contiguous(), h, weight, bias, mean, rstd, dh_extra, ctx.backend)
    dw = dw if weight is not None else None
    db = db if bias is not None else None
    return dx, dw, db, (dx if ctx.has_residual else None), None, None


torch.library.register_autograd("fastattn::layer_norm", _ln_backward, setup_context=_ln_setup)


# ------------------------------------------------------------------ rms norm

def rms_norm_impl(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _backend.log_dispatch("rms_norm", backend)
    impl = _backend.backend_module(backend, "rms_norm")
    y, rstd, h = impl.rms_norm_forward(x, weight, eps, residual)
    return y, rstd, (_empty(x) if h is None else h)


rms_norm_op = torch.library.custom_op("fastattn::rms_norm", rms_norm_impl, mutates_args=())


@rms_norm_op.register_fake
def _(x, weight, residual, eps, backend):
    return (torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32),
            _empty(x) if residual is None else torch.empty_like(x))


def rms_norm_backward_impl(dy: Tensor, h: Tensor, weight: Optional[Tensor], rstd: Tensor,
                           dh_extra: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    impl = _backend.backend_module(backend, "rms_norm")
    dx, dw = impl.rms_norm_backward(dy, h, weight, rstd, dh_extra)
    return dx, (_empty(h) if dw is None else dw)


rms_norm_backward_op = torch.library.custom_op("fastattn::rms_norm_backward",
                                               rms_norm_backward_impl, mutates_args=())


@rms_norm_backward_op.register_fake
def _(dy, h, weight, rstd, dh_extra, backend):
    return torch.empty_like(h), _empty(h) if weight is None else torch.empty_like(weight)


def _rms_setup(ctx, inputs, output):
    x, weight, residual, eps, backend = inputs
    y, rstd, h = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)
    ctx.backend = backend
    ctx.mark_non_differentiable(rstd)


def _rms_backward(ctx, dy, drstd, dh):
    h, weight, rstd = ctx.saved_tensors
    dh_extra = dh.contiguous() if ctx.has_residual and dh is not None else None
    dx, dw = _triton.for_ctx(rms_norm_backward_op, ctx)(dy.contiguous(), h, weight, rstd,
                                                        dh_extra, ctx.backend)
    return dx, (dw if weight is not None else None), (dx if ctx.has_residual else None), None, None


torch.library.register_autograd("fastattn::rms_norm", _rms_backward, setup_context=_rms_setup)


# torch.compile on the triton backend: the same bodies as fastattn_triton ops (ops/_triton.py)
_triton.register(layer_norm_backward_op, layer_norm_backward_impl)
_triton.register(layer_norm_op, layer_norm_impl, setup_context=_ln_setup, backward=_ln_backward)
_triton.register(rms_norm_backward_op, rms_norm_backward_impl)
_triton.register(rms_norm_op, rms_norm_impl, setup_context=_rms_setup, backward=_rms_backward)
