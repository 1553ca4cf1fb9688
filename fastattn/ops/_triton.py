"""Triton-only twins of the fastattn ops, so torch.compile sees the Triton kernels.

`torch.ops.fastattn.<op>` serves every backend, so it stays opaque to the compiler: the body of
a torch.library.triton_op must be traceable (tensor allocation, views and wrapped kernel
launches only), which the C++ and torch backends are not. Each op whose Triton launchers are
traceable therefore also registers `torch.ops.fastattn_triton.<op>`: the same schema (its
`backend` argument is always "triton") and the same body, registered with triton_op, the
launches going through kernels/_compat.launch (wrap_triton while traced).

- Eager calls never use the twins: the public functions call the fastattn op as before.
- Under torch.compile, `_backend.eager_call` (the one place that chooses) calls the twin
  instead when the backend chosen at trace time is triton. AOTAutograd then decomposes it
  into the kernels' triton_kernel_wrapper_functional nodes, which inductor compiles with the
  rest of the graph.
- The twin's autograd is the fastattn op's own setup_context/backward; `for_ctx` makes that
  backward call the backward twin, so the backward graph holds Triton kernel nodes too.

Ops registered here are listed in `registered()`: every fastattn op but attention_dropout_keep
(MultiHeadAttention's need_weights=True under dropout re-draws the keep-mask from the seed on
the host; it stays opaque, docs/architecture.md). Two write their inputs,
kvcache_attention (the caches it appends to) and rotary_ (in-place rotation); their twins
declare that in mutates_args, like the fastattn ops, so functionalisation writes them back.
"""

import functools
import inspect

import torch

from .. import _backend
from .._compat import HAS_TRITON_OP, register_ordered_effect
from ..kernels import _compat

NAMESPACE = "fastattn_triton"
_REGISTERED = []


def register(op, fn, *, setup_context=None, backward=None, mutates_args=()):
    """Register `fastattn_triton::<name of op>` running `fn` (the fastattn op's body, with the
    same annotated signature) as a torch.library.triton_op, and attach it to `op` as
    `op.triton_twin`. With `backward`, its autograd is (setup_context, backward), the fastattn
    op's own. `mutates_args` names the arguments the body writes in place, as on the fastattn
    op. Returns the twin (None on a torch without triton_op/wrap_triton)."""
    if not HAS_TRITON_OP:
        return None
    name = op._name
    params = list(inspect.signature(fn).parameters)
    keep = tuple(params.index(arg) for arg in mutates_args)

    @functools.wraps(fn)
    def body(*args, **kwargs):
        with _compat.triton_op_body():
            return fn(*_compat.traced_inputs(args, keep), **kwargs)

    twin = torch.library.triton_op(f"{NAMESPACE}::{name}", body, mutates_args=mutates_args)
    _REGISTERED.append(name)
    if backward is not None:
        def marked_setup(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.triton_twin = True

        twin.register_autograd(backward, setup_context=marked_setup)
    op.triton_twin = twin
    return twin


@torch.library.custom_op(f"{NAMESPACE}::log_dispatch", mutates_args=())
def log_dispatch_op(op: str, backend: str) -> None:
    """record_dispatch()'s entry for a traced fastattn_triton op, made when the graph runs
    (_backend.log_dispatch puts it in the graph)."""
    _backend.append_dispatch(op, backend)


@log_dispatch_op.register_fake
def _(op, backend):
    return None


if HAS_TRITON_OP:
    register_ordered_effect(torch.ops.fastattn_triton.log_dispatch.default)


def for_ctx(op, ctx):
    """The op a backward formula calls: `op`'s triton twin when the forward was a twin."""
    return op.triton_twin if getattr(ctx, "triton_twin", False) else op


def registered():
    """Names of the ops that have a triton twin."""
    return sorted(_REGISTERED)
