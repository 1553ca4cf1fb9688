"""fastattn.flash_attn: flash-attn 2's functions, checked against a float64 oracle written from
flash-attn's documented semantics (bottom-right causal and windows, softcap, GQA)."""

import math

import pytest
import torch

import fastattn
from fastattn import flash_attn as fa

from conftest import assert_close_2x, backend_device


def oracle(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> (B, Sq, H, D) float64; flash-attn's rules."""
    q, k, v = (t.double() for t in (q, k, v))
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq).view(-1, 1) + (sk - sq)                  # bottom-right diagonal
    j = torch.arange(sk).view(1, -1)
    visible = torch.ones(sq, sk, dtype=torch.bool)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                  # empty rows -> 0
    return torch.einsum("bhij,bjhd->bihd", p, v)


CASES = [
    # (B, Sq, Sk, H, Hkv, D, causal, window, softcap)
    (2, 7, 7, 4, 4, 16, False, (-1, -1), 0.0),
    (1, 5, 33, 4, 2, 40, True, (-1, -1), 0.0),        # decode-like Sq < Sk: bottom-right
    (2, 33, 5, 2, 1, 64, True, (-1, -1), 0.0),        # Sq > Sk: the first rows see nothing
    (1, 97, 97, 6, 3, 32, False, (8, 3), 0.0),
    (2, 17, 40, 4, 1, 16, True, (4, -1), 30.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_attn_func_matches_oracle(case, dtype, backend):
    b, sq, sk, h, hkv, d, causal, window, softcap = case
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, sq, h, d, generator=g).to(dev, dtype).requires_grad_()
    k = torch.randn(b, sk, hkv, d, generator=g).to(dev, dtype).requires_grad_()
    v = torch.randn(b, sk, hkv, d, generator=g).to(dev, dtype).requires_grad_()
    out = fa.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap)
    assert out.shape == (b, sq, h, d) and out.is_contiguous()
    dout = torch.randn(out.shape, generator=g).to(dev, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(qr, kr, vr, causal=causal, window=window, softcap=softcap)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    pt = oracle(qp, kp, vp, causal=causal, window=window, softcap=softcap).to(dtype)
    pt_grads = torch.autograd.grad(pt, (qp, kp, vp), dout)
    assert_close_2x(out, ref.to(out.dtype) if dtype == torch.float32 else ref, pt, name="out")
    for name, a, r, p in zip("qkv", grads, ref_grads, pt_grads):
        assert_close_2x(a, r.to(a.dtype) if dtype == torch.float32 else r, p, name=f"d{name}")


def test_packed_variants_equal_unpacked():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 19, 3, 4, 32, generator=g, requires_grad=True)
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(5, 0))
    q, k, v = qkv.detach().unbind(2)
    ref = fa.flash_attn_func(q, k, v, causal=True, window_size=(5, 0))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    assert qkv.grad.abs().sum() > 0

    qq = torch.randn(2, 6, 4, 32, generator=g)
    kv = torch.randn(2, 19, 2, 2, 32, generator=g)
    out = fa.flash_attn_kvpacked_func(qq, kv, causal=True)
    ref = fa.flash_attn_func(qq, kv[:, :, 0], kv[:, :, 1], causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_runs_on_fastattn_kernels():
    q = torch.randn(1, 9, 2, 16)
    with fastattn.record_dispatch() as calls:
        fa.flash_attn_func(q, q, q, causal=True)
    assert calls and all(backend != "torch" for _, backend in calls), calls


@pytest.mark.parametrize("kwargs, name", [
    (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
    (dict(return_attn_probs=True), "return_attn_probs"),
    (dict(window_size=(3,)), "window_size"),
])
def test_unsupported_arguments_raise_naming_them(kwargs, name):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=name):
        fa.flash_attn_func(q, q, q, **kwargs)


def test_bad_layout_names_the_argument():
    with pytest.raises(ValueError, match="qkv"):
        fa.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 16))
    with pytest.raises(ValueError, match="^q "):
        fa.flash_attn_func(torch.randn(4, 2, 16), torch.randn(1, 4, 2, 16),
                           torch.randn(1, 4, 2, 16))
