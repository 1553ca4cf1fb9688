"""Parity of the C++ rotary kernel (fastattn._C via fastattn._C_ops) with fastattn.reference:
both pair styles, partial rotary dim, offsets, conjugate, in place, out=, strided views.

CPU everywhere; the same tests on CUDA tensors are marked gpu (skipped without a GPU)."""

import pytest
import torch

from tolerances import ELEMENTWISE_FP32_TOL, TIGHT_FP32_TOL, assert_within_2x
from fastattn import _C_ops, reference

pytestmark = pytest.mark.skipif(_C_ops.unsupported("rotary") is not None,
                                reason="fastattn._C not built")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(b, s, h, d, rot, dtype, device, *, s_cache=None, offsets=False, seed=0):
    gen = torch.Generator().manual_seed(seed + b * 1000 + s * 10 + d)
    x = torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype)
    s_cache = s_cache or s + (5 if offsets else 0)
    cos, sin = reference.rotary_cache(s_cache, rot, device=device)
    offs = torch.randint(0, s_cache - s + 1, (b,), generator=gen).to(device) if offsets else None
    return x, cos, sin, offs


def _expected(x, cos, sin, interleaved, offsets, conjugate):
    kw = dict(interleaved=interleaved, seq_dim=1, offsets=offsets, conjugate=conjugate)
    return (reference.apply_rotary(x.float(), cos, sin, **kw),
            reference.apply_rotary(x, cos, sin, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("b,s,h,d,rot", [(1, 1, 1, 2, 2), (2, 7, 3, 64, 64), (1, 97, 2, 80, 32),
                                         (2, 33, 4, 128, 128), (1, 5, 2, 40, 18),
                                         (1, 9, 1, 256, 250)])
def test_forward(device, dtype, interleaved, b, s, h, d, rot):
    x, cos, sin, _ = _case(b, s, h, d, rot, dtype, device)
    out = _C_ops.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=None,
                                conjugate=False)
    ref, pt = _expected(x, cos, sin, interleaved, None, False)
    assert out.dtype == dtype
    assert_within_2x(out, ref, pt)
    assert torch.equal(out[..., rot:], x[..., rot:])  # the non-rotary tail is copied exactly


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("conjugate", [False, True])
@pytest.mark.parametrize("offsets", [False, True])
def test_options(device, dtype, interleaved, conjugate, offsets):
    x, cos, sin, offs = _case(3, 11, 2, 48, 40, dtype, device, offsets=offsets)
    out = _C_ops.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=offs,
                                conjugate=conjugate)
    ref, pt = _expected(x, cos, sin, interleaved, offs, conjugate)
    assert_within_2x(out, ref, pt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_conjugate_inverts(device, interleaved):
    x, cos, sin, offs = _case(2, 16, 3, 64, 64, torch.float32, device, offsets=True)
    y = _C_ops.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=offs, conjugate=False)
    back = _C_ops.rotary_forward(y, cos, sin, interleaved=interleaved, offsets=offs,
                                 conjugate=True)
    torch.testing.assert_close(back, x, **TIGHT_FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_in_place_and_out(device, dtype, interleaved):
    x, cos, sin, offs = _case(2, 13, 3, 72, 64, dtype, device, offsets=True)
    ref, pt = _expected(x, cos, sin, interleaved, offs, False)
    xi = x.clone()
    ret = _C_ops.rotary_forward(xi, cos, sin, interleaved=interleaved, offsets=offs,
                                conjugate=False, out=xi)
    assert ret is xi
    assert_within_2x(xi, ref, pt)
    out = torch.full_like(x, float("nan"))
    _C_ops.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=offs, conjugate=False,
                          out=out)
    assert_within_2x(out, ref, pt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_strided(device, interleaved):
    # SDPA layout (B, H, S, D) seen as (B, S, H, D); a strided last dim; a strided in-place view.
    base = torch.randn(2, 4, 19, 64, device=device)
    cos, sin = reference.rotary_cache(19, 48, device=device)
    x = base.transpose(1, 2)
    out = _C_ops.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=None,
                                conjugate=False)
    ref, _ = _expected(x, cos, sin, interleaved, None, False)
    torch.testing.assert_close(out, ref, **ELEMENTWISE_FP32_TOL)
    xs = torch.randn(2, 19, 4, 128, device=device)[..., ::2]
    out = _C_ops.rotary_forward(xs, cos, sin, interleaved=interleaved, offsets=None,
                                conjugate=False)
    torch.testing.assert_close(out, _expected(xs, cos, sin, interleaved, None, False)[0],
                               **ELEMENTWISE_FP32_TOL)
    y = base.clone()
    view = y.transpose(1, 2)
    _C_ops.rotary_forward(view, cos, sin, interleaved=interleaved, offsets=None,
                          conjugate=False, out=view)
    torch.testing.assert_close(view, ref, **ELEMENTWISE_FP32_TOL)
    strided_out = torch.empty(2, 19, 4, 130, device=device)[..., 1:65]
    _C_ops.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=None, conjugate=False,
                          out=strided_out)
    torch.testing.assert_close(strided_out, ref, **ELEMENTWISE_FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_cache(device):
    x, cos, sin, _ = _case(1, 8, 2, 32, 32, torch.bfloat16, device)
    out = _C_ops.rotary_forward(x, cos.to(torch.bfloat16), sin.to(torch.bfloat16),
                                interleaved=False, offsets=None, conjugate=False)
    ref, pt = _expected(x, cos, sin, False, None, False)
    assert_within_2x(out, ref, pt)


@pytest.mark.parametrize("device", DEVICES)
def test_qk(device):
    q, cos, sin, offs = _case(2, 10, 4, 64, 64, torch.float32, device, offsets=True)
    k = torch.randn(2, 10, 2, 64, device=device)
    qo, ko = _C_ops.rotary_forward_qk(q, k, cos, sin, interleaved=False, offsets=offs,
                                      conjugate=False, q_out=torch.empty_like(q),
                                      k_out=torch.empty_like(k))
    torch.testing.assert_close(qo, _expected(q, cos, sin, False, offs, False)[0])
    torch.testing.assert_close(ko, _expected(k, cos, sin, False, offs, False)[0])
