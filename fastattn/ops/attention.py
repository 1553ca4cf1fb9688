"""Attention as torch.library custom ops with autograd and fake (meta) implementations.

`fastattn::attention` (forward, returns out and lse) and `fastattn::attention_backward` (backward)
take the backend chosen by the caller as an argument, so forward and backward run on the same
backend even when autograd runs the backward on another thread, and torch.compile bakes the
choice into the graph. They are opaque custom ops (not `triton_op`): one op serves every backend,
and the Triton launcher inside picks its own autotuned kernel. Under torch.compile on the triton
backend their fastattn_triton twins (ops/_triton.py) run instead, so the graph holds the kernels.

`alibi_slopes` (last argument, None or a contiguous fp32 (B, H) tensor; the public function
validates and normalises it) is an input without a gradient; it reaches a backend module only
when given (`alibi_kwargs`), so adaptors without ALiBi keep working for every other call.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks
from . import _triton

ALIGNMENTS = ("top_left", "bottom_right")


def _alignment(bottom_right):
    return "bottom_right" if bottom_right else "top_left"


def alibi_kwargs(alibi_slopes):
    """{"alibi_slopes": t} for a backend-module call, or {} without ALiBi."""
    return {} if alibi_slopes is None else {"alibi_slopes": alibi_slopes}


def alibi_arg(alibi_slopes):
    """The trailing op argument: (t,), or () without ALiBi (the default None), so a call
    without ALiBi is the same op call as before the argument existed."""
    return () if alibi_slopes is None else (alibi_slopes,)


def rng_kwargs(rng):
    """seed= and offset= of a backend call from the dropout rng ((2,) int64 tensor or None):
    its two elements as one-element tensors. Backends take ints or such tensors; the triton
    launchers hand them to the kernels as a tensor without reading them on the host (what lets
    torch.compile trace the fastattn_triton twins), the others convert them with int()."""
    if rng is None:
        return dict(seed=0, offset=0)
    return dict(seed=rng[0], offset=rng[1])


def attention_impl(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                   key_lengths: Optional[Tensor], rng: Optional[Tensor], scale: float,
                   causal: bool, bottom_right: bool, window_left: int, window_right: int,
                   softcap: float, dropout_p: float, deterministic: bool,
                   backend: str, alibi_slopes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """out (B, H, Sq, Dv), lse (B, H, Sq) fp32. `deterministic` is used by the backward only.
    (The body of `attention_op`; `_backend.eager_call` calls it directly when nothing needs
    the custom op.)"""
    _backend.log_dispatch("attention", backend)
    impl = _backend.backend_module(backend, "attention")
    out, lse = impl.attention_forward(
        q, k, v, mask=mask, scale=scale, causal=causal, alignment=_alignment(bottom_right),
        window_left=window_left, window_right=window_right, softcap=softcap,
        key_lengths=key_lengths, dropout_p=dropout_p, **rng_kwargs(rng),
        **alibi_kwargs(alibi_slopes))
    # Outputs are contiguous whatever the backend, as the fake implementation promises.
    return out.contiguous(), lse.contiguous()


attention_op = torch.library.custom_op("fastattn::attention", attention_impl, mutates_args=())


@attention_op.register_fake
def _(q, k, v, mask, key_lengths, rng, scale, causal, bottom_right, window_left, window_right,
      softcap, dropout_p, deterministic, backend, alibi_slopes=None):
    b, h, sq, _ = q.shape
    out = q.new_empty(b, h, sq, v.shape[-1])
    lse = q.new_empty(b, h, sq, dtype=torch.float32)
    return out, lse


def attention_backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                            lse: Tensor, mask: Optional[Tensor], key_lengths: Optional[Tensor],
                            rng: Optional[Tensor], scale: float, causal: bool,
                            bottom_right: bool, window_left: int, window_right: int,
                            softcap: float, dropout_p: float, deterministic: bool,
                            mask_needs_grad: bool, backend: str,
                            alibi_slopes: Optional[Tensor] = None
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, and dmask (fp32 (B, H, Sq, Sk); empty unless mask_needs_grad)."""
    impl = _backend.backend_module(backend, "attention")
    dq, dk, dv, dmask = impl.attention_backward(
        dout, q, k, v, out, lse, mask=mask, scale=scale, causal=causal,
        alignment=_alignment(bottom_right), window_left=window_left, window_right=window_right,
        softcap=softcap, key_lengths=key_lengths, dropout_p=dropout_p, **rng_kwargs(rng),
        deterministic=deterministic, mask_needs_grad=mask_needs_grad,
        **alibi_kwargs(alibi_slopes))
    if dmask is None:
        dmask = q.new_empty(0, dtype=torch.float32)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask.contiguous()


attention_backward_op = torch.library.custom_op("fastattn::attention_backward",
                                                attention_backward_impl, mutates_args=())


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, mask, key_lengths, rng, scale, causal, bottom_right, window_left,
      window_right, softcap, dropout_p, deterministic, mask_needs_grad, backend,
      alibi_slopes=None):
    dmask = (q.new_empty(mask.shape, dtype=torch.float32) if mask_needs_grad
             else q.new_empty(0, dtype=torch.float32))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    (q, k, v, mask, key_lengths, rng, scale, causal, bottom_right, window_left, window_right,
     softcap, dropout_p, deterministic, backend, alibi_slopes) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, key_lengths, rng, alibi_slopes)
    ctx.args = (scale, causal, bottom_right, window_left, window_right, softcap, dropout_p,
                deterministic)
    ctx.backend = backend
    ctx.mask_needs_grad = (mask is not None and mask.is_floating_point()
                           and ctx.needs_input_grad[3])
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, key_lengths, rng, alibi_slopes = ctx.saved_tensors
    backward_op = _triton.for_ctx(attention_backward_op, ctx)
    dq, dk, dv, dmask = backward_op(dout.contiguous(), q, k, v, out, lse, mask, key_lengths, rng,
                                    *ctx.args, ctx.mask_needs_grad, ctx.backend, alibi_slopes)
    dmask = dmask.to(mask.dtype) if ctx.mask_needs_grad else None
    # no gradient for alibi_slopes (the public functions refuse slopes that require grad)
    return (dq, dk, dv, dmask) + (None,) * 12


torch.library.register_autograd("fastattn::attention", _backward, setup_context=_setup_context)

# torch.compile on the triton backend: the same bodies as fastattn_triton ops (ops/_triton.py)
_triton.register(attention_backward_op, attention_backward_impl)
_triton.register(attention_op, attention_impl, setup_context=_setup_context, backward=_backward)


def attend(q, k, v, *, mask=None, key_lengths=None, scale, causal=False, bottom_right=False,
           window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.0, deterministic=False,
           alibi_slopes=None):
    """The one internal attention entry, behind fastattn.scaled_dot_product_attention,
    MultiHeadAttention and attention_forward_with_lse: validated, normalised arguments in
    (q (B, H, Sq, D), k/v (B, Hkv, Sk, D), mask expanded to (B, H, Sq, Sk) or None,
    alibi_slopes None or contiguous fp32 (B, H)), the
    backend chosen once, the op called. Returns out (B, H, Sq, Dv), lse (B, H, Sq) fp32, the
    backend and the dropout rng (seed, offset) or None (MultiHeadAttention's weights reuse
    both)."""
    backend = select_backend(q, k, v, mask=mask, key_lengths=key_lengths, causal=causal,
                             bottom_right=bottom_right, window_left=window_left,
                             window_right=window_right, softcap=softcap, dropout_p=dropout_p,
                             deterministic=deterministic, alibi=alibi_slopes is not None)
    rng = None
    if dropout_p > 0:
        # (seed, offset) from torch's default generator, so torch.manual_seed reproduces runs.
        rng = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64)
    out, lse = _backend.eager_call(
        attention_op, attention_impl, backend, q, k, v, mask, key_lengths, rng, scale, causal,
        bottom_right, window_left, window_right, softcap, dropout_p, deterministic, backend,
        *alibi_arg(alibi_slopes))
    return out, lse, backend, rng


def select_backend(q, k, v, *, mask=None, key_lengths=None, causal=False, bottom_right=False,
                   window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.0,
                   deterministic=False, alibi=False):
    """The backend that runs this attention call (forward and backward). alibi: whether the
    call has alibi_slopes (a case key, so a backend can decline it)."""
    mask_needs_grad = (mask is not None and mask.is_floating_point() and mask.requires_grad
                       and torch.is_grad_enabled())
    return _backend.select(
        "attention", q.device.type, dtype=q.dtype, head_dim=q.shape[-1],
        v_head_dim=v.shape[-1],
        mask=_checks.mask_kind(mask), mask_needs_grad=mask_needs_grad, causal=causal,
        alignment=_alignment(bottom_right), window=window_left >= 0 or window_right >= 0,
        softcap=softcap, key_lengths=key_lengths is not None, dropout_p=dropout_p,
        gqa=q.shape[1] != k.shape[1], deterministic=deterministic, alibi=bool(alibi),
        device=q.device.type)
