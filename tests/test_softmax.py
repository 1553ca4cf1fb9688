"""fastattn.softmax on every backend against the reference (output and gradients)."""

import pytest
import torch
from conftest import backend_device
from tolerances import assert_within_2x

import fastattn
from fastattn import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_softmax(x, dim=-1, mask=None, **kw):
    leaf = x.detach().clone().requires_grad_()
    mask_leaf = mask.detach().clone().requires_grad_() if mask is not None and \
        mask.is_floating_point() else mask
    y = fastattn.softmax(leaf, dim, mask=mask_leaf, **kw)

    def ref_run(dtype):
        xr = x.detach().to(dtype).requires_grad_()
        mr = mask
        if mask is not None and mask.is_floating_point():
            mr = mask.detach().to(dtype).requires_grad_()
        return reference.softmax(xr, dim, mask=mr, **kw), [xr] + ([mr] if mr is not None and
                                                                mr.is_floating_point() else [])

    ref, ref_in = ref_run(torch.float32)
    pt, pt_in = ref_run(x.dtype)
    assert_within_2x(y, ref, pt, name="y")
    dy = torch.randn_like(y)
    ours_in = [leaf] + ([mask_leaf] if mask is not None and mask.is_floating_point() else [])
    ours = torch.autograd.grad(y, ours_in, dy)
    theirs = torch.autograd.grad(ref, ref_in, dy.float())
    lowp = torch.autograd.grad(pt, pt_in, dy)
    for name, a, r, p in zip(("dx", "dmask"), ours, theirs, lowp):
        assert_within_2x(a, r, p, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (7, 33), (97, 1000), (3, 4097), (2, 65536)])
def test_sizes(backend, dtype, rows, n):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(
        backend_device(backend), dtype)
    check_softmax(x, scale=0.7)


def test_other_dim(backend):
    x = torch.randn(4, 9, 6).to(backend_device(backend))
    check_softmax(x, dim=1)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_and_causal(backend, kind):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 17, 29, generator=g).to(dev)
    if kind == "bool":
        mask = (torch.rand(17, 29, generator=g) > 0.4).to(dev)
        mask[5] = False                                    # a fully masked row
    else:
        mask = torch.randn(3, 1, 29, generator=g).to(dev)
    check_softmax(x, mask=mask)
    check_softmax(x, mask=mask, causal=True)
    y = fastattn.softmax(x, mask=torch.zeros(17, 29, dtype=torch.bool, device=dev))
    assert torch.all(y == 0)


def test_bad_input():
    with pytest.raises(ValueError, match="x must have a floating dtype"):
        fastattn.softmax(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        fastattn.softmax(torch.ones(3, 4), mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        fastattn.softmax(torch.ones(3, 4), dim=0, causal=True)
