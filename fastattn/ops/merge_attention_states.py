"""Merging two partial attention results as the custom op `fastattn::merge_attention_states`.

The forward runs on the chosen backend's kernel; the backward is the same few pointwise torch
ops on every backend (it is cheap next to attention, and ring attention's own backward does not
differentiate through merges: it uses the merged statistics directly).
"""

import torch
from torch import Tensor

from .. import _backend
from . import _triton


def merge_impl(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor,
               backend: str) -> tuple[Tensor, Tensor]:
    _backend.log_dispatch("merge_attention_states", backend)
    impl = _backend.backend_module(backend, "merge_attention_states")
    out, lse = impl.merge_attention_states(out_a, lse_a, out_b, lse_b)
    return out.contiguous(), lse.contiguous()


merge_op = torch.library.custom_op("fastattn::merge_attention_states", merge_impl,
                                   mutates_args=())


@merge_op.register_fake
def _(out_a, lse_a, out_b, lse_b, backend):
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)


def _setup_context(ctx, inputs, output):
    out_a, lse_a, out_b, lse_b, _ = inputs
    out, lse = output
    ctx.save_for_backward(out_a, lse_a, out_b, lse_b, out, lse)


def _backward(ctx, dout, dlse):
    # out = w_a out_a + w_b out_b, w_x = exp(lse_x - lse), lse = logaddexp(lse_a, lse_b):
    #   d out_x = w_x dout;   d lse_x = w_x (dlse + sum_d dout * (out_x - out)).
    # w_x = 0 on an empty side or row (lse_x = -inf), so those rows get zero gradients.
    out_a, lse_a, out_b, lse_b, out, lse = ctx.saved_tensors
    finite = torch.isfinite(lse)
    safe_lse = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe_lse), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - safe_lse), torch.zeros_like(lse))
    do = dout.float() if dout is not None else torch.zeros(out.shape, device=out.device)
    dl = dlse.float() if dlse is not None else torch.zeros_like(lse)
    of = out.float()
    d_lse_a = w_a * (dl + (do * (out_a.float() - of)).sum(-1))
    d_lse_b = w_b * (dl + (do * (out_b.float() - of)).sum(-1))
    d_out_a = (w_a.unsqueeze(-1) * do).to(out_a.dtype)
    d_out_b = (w_b.unsqueeze(-1) * do).to(out_b.dtype)
    return d_out_a, d_lse_a, d_out_b, d_lse_b, None


torch.library.register_autograd("fastattn::merge_attention_states", _backward,
                                setup_context=_setup_context)

# torch.compile on the triton backend: the same body as a fastattn_triton op (ops/_triton.py)
_triton.register(merge_op, merge_impl, setup_context=_setup_context, backward=_backward)
