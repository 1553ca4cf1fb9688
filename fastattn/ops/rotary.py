"""Rotary position embeddings as custom ops with autograd.

Tensors arrive as (B, S, H, D) views (any strides). The backward of a rotation is the rotation
by the negative angle (`conjugate`), so one kernel serves both directions. cos/sin are treated
as constants (the public function refuses ones that require grad).
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _triton


def _rotate(x, cos, sin, interleaved, offsets, conjugate, out, backend, positions=None):
    if not conjugate:           # the forward (the conjugate rotation is the backward)
        _backend.log_dispatch("rotary", backend)
    impl = _backend.backend_module(backend, "rotary")
    if positions is None:   # backends predating positions keep working
        return impl.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=offsets,
                                   conjugate=conjugate, out=out)
    return impl.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=offsets,
                               conjugate=conjugate, out=out, positions=positions)


def rotary_impl(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor],
                interleaved: bool, conjugate: bool, backend: str,
                positions: Optional[Tensor] = None) -> Tensor:
    out = torch.empty_like(x)
    _rotate(x, cos, sin, interleaved, offsets, conjugate, out, backend, positions)
    return out


rotary_op = torch.library.custom_op("fastattn::rotary", rotary_impl, mutates_args=())


@rotary_op.register_fake
def _(x, cos, sin, offsets, interleaved, conjugate, backend, positions=None):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, cos, sin, offsets, interleaved, conjugate, backend, positions = inputs
    ctx.save_for_backward(cos, sin, offsets, positions)
    ctx.args = (interleaved, conjugate, backend)


def _backward(ctx, dy):
    cos, sin, offsets, positions = ctx.saved_tensors
    interleaved, conjugate, backend = ctx.args
    dx = _triton.for_ctx(rotary_op, ctx)(dy, cos, sin, offsets, interleaved, not conjugate,
                                         backend, positions)
    return dx, None, None, None, None, None, None, None


torch.library.register_autograd("fastattn::rotary", _backward, setup_context=_setup)


def rotary_inplace_impl(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor],
                        interleaved: bool, conjugate: bool, backend: str,
                        positions: Optional[Tensor] = None) -> None:
    """In-place rotation (no autograd: for inference and KV caches)."""
    _rotate(x, cos, sin, interleaved, offsets, conjugate, x, backend, positions)


rotary_inplace_op = torch.library.custom_op("fastattn::rotary_", rotary_inplace_impl,
                                            mutates_args=("x",))


def _rotary_inplace_traced(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor],
                           interleaved: bool, conjugate: bool, backend: str,
                           positions: Optional[Tensor] = None) -> None:
    """The triton twin's body: the rotation into a new tensor, then copied into x. A traced
    launch cannot take x as both its input and its output (torch would see one tensor passed
    twice); functionalisation turns the copy into the write-back of the declared mutation."""
    out = torch.empty_like(x)
    _rotate(x, cos, sin, interleaved, offsets, conjugate, out, backend, positions)
    x.copy_(out)


@rotary_inplace_op.register_fake
def _(x, cos, sin, offsets, interleaved, conjugate, backend, positions=None):
    return None


def rotary_qk_impl(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor],
                   interleaved: bool, conjugate: bool, backend: str,
                   positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """q and k rotated (one launch on the triton backend; two on cpu and cuda)."""
    if not conjugate:
        _backend.log_dispatch("rotary", backend)
    impl = _backend.backend_module(backend, "rotary")
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    extra = {} if positions is None else {"positions": positions}
    impl.rotary_forward_qk(q, k, cos, sin, interleaved=interleaved, offsets=offsets,
                           conjugate=conjugate, q_out=q_out, k_out=k_out, **extra)
    return q_out, k_out


rotary_qk_op = torch.library.custom_op("fastattn::rotary_qk", rotary_qk_impl, mutates_args=())


@rotary_qk_op.register_fake
def _(q, k, cos, sin, offsets, interleaved, conjugate, backend, positions=None):
    return torch.empty_like(q), torch.empty_like(k)


def _qk_setup(ctx, inputs, output):
    q, k, cos, sin, offsets, interleaved, conjugate, backend, positions = inputs
    ctx.save_for_backward(cos, sin, offsets, positions)
    ctx.args = (interleaved, conjugate, backend)


def _qk_backward(ctx, dq, dk):
    cos, sin, offsets, positions = ctx.saved_tensors
    interleaved, conjugate, backend = ctx.args
    dq_in, dk_in = _triton.for_ctx(rotary_qk_op, ctx)(
        dq.contiguous(), dk.contiguous(), cos, sin, offsets, interleaved, not conjugate, backend,
        positions)
    return dq_in, dk_in, None, None, None, None, None, None, None


torch.library.register_autograd("fastattn::rotary_qk", _qk_backward, setup_context=_qk_setup)


# torch.compile on the triton backend: the same bodies as fastattn_triton ops (ops/_triton.py);
# the in-place rotary_'s twin declares its mutation of x, like the fastattn op.
_triton.register(rotary_op, rotary_impl, setup_context=_setup, backward=_backward)
_triton.register(rotary_qk_op, rotary_qk_impl, setup_context=_qk_setup, backward=_qk_backward)
_triton.register(rotary_inplace_op, _rotary_inplace_traced, mutates_args=("x",))
