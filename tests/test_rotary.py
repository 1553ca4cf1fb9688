"""fastattn.apply_rotary / apply_rotary_qk on every backend against the reference."""

import pytest
import torch
from conftest import backend_device
from tolerances import ELEMENTWISE_FP32_TOL, assert_within_2x

import fastattn
from fastattn import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_rotary(x, cos, sin, **kw):
    leaf = x.detach().clone().requires_grad_()
    y = fastattn.apply_rotary(leaf, cos, sin, **kw)
    xr = x.detach().float().requires_grad_()
    ref = reference.apply_rotary(xr, cos, sin, **kw)
    xp = x.detach().clone().requires_grad_()
    pt = reference.apply_rotary(xp, cos, sin, **kw)
    assert_within_2x(y, ref, pt, name="y")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, leaf, dy)
    (dref,) = torch.autograd.grad(ref, xr, dy.float())
    (dpt,) = torch.autograd.grad(pt, xp, dy)
    assert_within_2x(dx, dref, dpt, name="dx")
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d,rot", [(64, 64), (40, 16), (80, 80), (33, 32)])
def test_styles_and_partial(backend, dtype, interleaved, d, rot):
    dev = backend_device(backend)
    cos, sin = fastattn.rotary_cache(50, rot, device=dev)
    x = torch.randn(2, 3, 7, d).to(dev, dtype)                 # (B, H, S, D)
    check_rotary(x, cos, sin, interleaved=interleaved)


def test_layouts_and_offsets(backend):
    dev = backend_device(backend)
    cos, sin = fastattn.rotary_cache(64, 32, device=dev)
    x = torch.randn(3, 9, 4, 32, device=dev)                   # (B, S, H, D)
    check_rotary(x, cos, sin, seq_dim=1, offsets=torch.tensor([0, 5, 30], device=dev))
    check_rotary(x[:, :, 1:3], cos, sin, seq_dim=1)              # strided view
    check_rotary(x.transpose(1, 2), cos, sin)                    # (B, H, S, D) non-contiguous
    check_rotary(torch.randn(9, 32, device=dev), cos, sin)      # (S, D)
    check_rotary(torch.randn(2, 9, 32, device=dev), cos, sin, seq_dim=1)


def test_inplace_and_qk(backend):
    dev = backend_device(backend)
    cos, sin = fastattn.rotary_cache(16, 8, device=dev)
    x = torch.randn(2, 2, 5, 12, device=dev)
    expected = reference.apply_rotary(x, cos, sin)
    y = x.clone()
    out = fastattn.apply_rotary(y, cos, sin, inplace=True)
    assert out is y
    torch.testing.assert_close(y, expected, **ELEMENTWISE_FP32_TOL)
    q = torch.randn(2, 4, 5, 12, device=dev, requires_grad=True)
    k = torch.randn(2, 2, 5, 12, device=dev, requires_grad=True)
    with fastattn.record_dispatch() as calls:
        qo, ko = fastattn.apply_rotary_qk(q, k, cos, sin, interleaved=True)
    assert len(calls) == 1
    torch.testing.assert_close(qo, reference.apply_rotary(q, cos, sin, interleaved=True),
                               **ELEMENTWISE_FP32_TOL)
    torch.testing.assert_close(ko, reference.apply_rotary(k, cos, sin, interleaved=True),
                               **ELEMENTWISE_FP32_TOL)
    (qo.sum() + 2 * ko.sum()).backward()
    ones = torch.ones_like(q)
    torch.testing.assert_close(q.grad, reference.apply_rotary(ones, cos, sin, interleaved=True,
                                                              conjugate=True),
                               **ELEMENTWISE_FP32_TOL)


def test_bad_input():
    cos, sin = fastattn.rotary_cache(8, 8)
    with pytest.raises(ValueError, match="head dim"):
        fastattn.apply_rotary(torch.randn(1, 4, 6), cos, sin)
    with pytest.raises(ValueError, match="cache"):
        fastattn.apply_rotary(torch.randn(1, 9, 8), cos, sin)
    with pytest.raises(ValueError, match="x must have a floating dtype"):
        fastattn.apply_rotary(torch.ones(1, 4, 8, dtype=torch.int32), cos, sin)
    with pytest.raises(ValueError, match="offsets"):
        fastattn.apply_rotary(torch.randn(2, 4, 8), cos, sin, seq_dim=1,
                              offsets=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cos"):
        fastattn.apply_rotary(torch.randn(1, 4, 8), cos.requires_grad_(), sin)
