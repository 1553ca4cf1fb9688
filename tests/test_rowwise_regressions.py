"""Issue #12's reproductions for the row-wise ops (softmax, norms, rotary), each a named test
on every backend that runs here (the `backend` fixture of conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference

from conftest import backend_device
from tolerances import ELEMENTWISE_FP32_TOL, HUGE_LOGIT_SOFTMAX_FP32_TOL, INPLACE_ROTARY_LOWP_TOL


# ------------------------------------------------------------------ item 4: in-place rotary

def _reversed_strides(shape, dtype, gen):
    """A tensor of `shape` whose storage holds the dims in reverse order (strides increase
    from dim 0 to the last): the 5-D head dims of the issue cannot be merged into one view."""
    base = torch.randn(tuple(reversed(shape)), generator=gen).to(dtype)
    return base.permute(*reversed(range(len(shape))))


def test_issue12_inplace_rotary_5d_non_mergeable_writes_into_x(backend):
    """x (2, 109, 8, 2, 80) fp16 in a reversed-stride layout, seq_dim=1, rotary dim 24,
    per-batch offsets: in place used to rotate a copy and return x unchanged."""
    dev = backend_device(backend)
    gen = torch.Generator().manual_seed(0)
    x = _reversed_strides((2, 109, 8, 2, 80), torch.float16, gen).to(dev)
    assert x.stride()[0] == 1 and not x.is_contiguous()
    with pytest.raises(RuntimeError):
        x.movedim(1, 1).view(2, 109, 16, 80)          # the head dims do not merge
    cos, sin = fastattn.rotary_cache(140, 24, device=dev)
    offsets = torch.tensor([3, 17], device=dev)
    x0 = x.clone()
    expected = fastattn.apply_rotary(x0, cos, sin, seq_dim=1, offsets=offsets)
    oracle = reference.apply_rotary(x0.float(), cos, sin, seq_dim=1, offsets=offsets)
    storage_before = x.data_ptr(), x.stride()
    out = fastattn.apply_rotary(x, cos, sin, seq_dim=1, offsets=offsets, inplace=True)
    assert out is x and (x.data_ptr(), x.stride()) == storage_before
    assert not torch.equal(x, x0), "in place left x unchanged"
    torch.testing.assert_close(x, expected, atol=0, rtol=0)
    torch.testing.assert_close(x.float(), oracle, **INPLACE_ROTARY_LOWP_TOL)
    assert torch.equal(x[..., 24:], x0[..., 24:])     # features past the rotary dim untouched


def test_issue12_inplace_rotary_mergeable_5d_stays_a_view(backend):
    """A 5-D x whose head dims merge is rotated through a view (no copy-back needed)."""
    dev = backend_device(backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 3, 2, 16, generator=gen).to(dev)
    cos, sin = fastattn.rotary_cache(7, 16, device=dev)
    expected = reference.apply_rotary(x, cos, sin, seq_dim=1)
    fastattn.apply_rotary(x, cos, sin, seq_dim=1, inplace=True)
    torch.testing.assert_close(x, expected, **ELEMENTWISE_FP32_TOL)


@pytest.mark.parametrize("how", ["expand_batch", "expand_heads"])
def test_issue12_inplace_rotary_on_expanded_x_is_rejected_on_every_backend(backend, how):
    """In place on an x whose elements share memory (an expanded tensor): the triton backend
    used to accept it while cpu refused; the check is now in fastattn.functional."""
    dev = backend_device(backend)
    cos, sin = fastattn.rotary_cache(5, 16, device=dev)
    if how == "expand_batch":
        x = torch.randn(1, 5, 2, 16, device=dev).expand(3, 5, 2, 16)
    else:
        x = torch.randn(2, 5, 1, 16, device=dev).expand(2, 5, 4, 16)
    before = x.clone()
    with pytest.raises(ValueError, match="overlaps itself"):
        fastattn.apply_rotary(x, cos, sin, seq_dim=1, inplace=True)
    assert torch.equal(x, before)
    # out of place it is fine
    y = fastattn.apply_rotary(x, cos, sin, seq_dim=1)
    torch.testing.assert_close(y, reference.apply_rotary(before, cos, sin, seq_dim=1),
                               **ELEMENTWISE_FP32_TOL)


# ------------------------------------------------------------------ item 10: softmax

def test_issue12_softmax_mask_on_another_device_is_rejected():
    """A meta-device mask used to return values up to 1e21; now a ValueError naming mask."""
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="mask is on meta"):
        fastattn.softmax(x, mask=torch.ones(3, 8, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="mask is on meta"):
        fastattn.softmax(x, mask=torch.zeros(8, device="meta"))


@pytest.mark.parametrize("scale", [1.0, 3.0, 0.3, 1 / 8])
@pytest.mark.parametrize("masked", [False, True])
def test_issue12_softmax_huge_logits_are_one_hot(backend, scale, masked):
    """Logits near 5e9 gave all-zero rows on the cpu backend (the scale folded into the exp's
    fma left the max column at exp(-hundreds)); PyTorch gives finite one-hot rows."""
    dev = backend_device(backend)
    gen = torch.Generator().manual_seed(2)
    x = (5e9 + torch.randn(6, 333, generator=gen) * 1e8).to(dev)
    x[:, 7] = 5.9e9                                       # a clear maximum in every row
    mask = torch.ones(6, 333, dtype=torch.bool, device=dev) if masked else None
    y = fastattn.softmax(x, scale=scale, mask=mask)
    expected = torch.softmax(x.double() * scale, -1).float()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, expected, **HUGE_LOGIT_SOFTMAX_FP32_TOL)
    assert torch.equal(y.argmax(-1), torch.full((6,), 7, device=dev))


# ------------------------------------------------------------------ item 10: layer_norm, rms_norm

@pytest.mark.parametrize("shape,nshape", [((4, 0), (0,)), ((2, 3, 0), (3, 0)), ((0,), (0,)),
                                          ((0, 8), (8,))])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_issue12_layer_norm_over_zero_size_dims_return_empty(backend, kind, shape, nshape):
    """Norms over a zero-size dim failed in a reshape; PyTorch returns empty tensors (and
    zero gradients for the weight)."""
    dev = backend_device(backend)
    x = torch.randn(shape, device=dev, requires_grad=True)
    w = torch.randn(nshape, device=dev, requires_grad=True)
    r = torch.randn(shape, device=dev)
    if kind == "layer_norm":
        y = fastattn.layer_norm(x, nshape, w)
        expected = F.layer_norm(x, nshape, w)
        y2, h = fastattn.layer_norm(x, nshape, w, residual=r)
    else:
        y = fastattn.rms_norm(x, nshape, w)
        expected = F.rms_norm(x, nshape, w)
        y2, h = fastattn.rms_norm(x, nshape, w, residual=r)
    assert y.shape == expected.shape == x.shape and y2.shape == h.shape == x.shape
    gx, gw = torch.autograd.grad(y.sum() + y2.sum(), (x, w))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))


# ------------------------------------------------------------------ item 10: error messages

def test_issue12_integer_dtype_errors_do_not_say_floating():
    x = torch.randn(2, 5, 2, 16)
    cos, sin = fastattn.rotary_cache(8, 16)
    with pytest.raises(ValueError) as info:
        fastattn.apply_rotary(x, cos, sin, seq_dim=1, offsets=torch.zeros(2))
    msg = str(info.value)
    assert "offsets must have dtype (int32, int64), got torch.float32" in msg
    assert "floating" not in msg
    # the float-only checks still say what they want
    with pytest.raises(ValueError, match="x must have a floating dtype"):
        fastattn.softmax(torch.ones(3, dtype=torch.int32))
