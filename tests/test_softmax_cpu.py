"""Parity of the C++ softmax kernels (fastattn._C via fastattn._C_ops) with fastattn.reference.

CPU everywhere; the same tests on CUDA tensors are marked gpu (skipped without a GPU)."""

import pytest
import torch

from tolerances import CPU_EXP_FP32_TOL, ELEMENTWISE_FP32_TOL, assert_within_2x
from fastattn import _C_ops, reference

pytestmark = pytest.mark.skipif(_C_ops.unsupported("softmax") is not None,
                                reason="fastattn._C not built")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mask(kind, shape, device, dtype, gen):
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(shape, generator=gen).to(device) > 0.3
    if kind == "float":
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    # "broadcast": one float row per column, expanded (stride-0 dims) as the ops layer does
    m = torch.randn(shape[-1], generator=gen).to(device=device, dtype=dtype)
    return m.expand(shape)


def _check_forward(x, *, scale, mask, causal):
    y = _C_ops.softmax_forward(x, scale=scale, mask=mask, causal=causal)
    fmask = mask.float() if mask is not None and mask.is_floating_point() else mask
    ref = reference.softmax(x.float(), scale=scale, mask=fmask, causal=causal)
    pt = reference.softmax(x, scale=scale, mask=mask, causal=causal)
    assert y.dtype == x.dtype
    assert_within_2x(y, ref, pt)
    return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 33), (97, 1000), (1, 4097), (3, 65536)])
def test_forward_shapes(device, dtype, rows, cols):
    gen = torch.Generator().manual_seed(rows * 7919 + cols)
    x = (3 * torch.randn(rows, cols, generator=gen)).to(device=device, dtype=dtype)
    _check_forward(x, scale=None, mask=None, causal=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "broadcast"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_forward_options(device, dtype, mask_kind, causal, scale):
    gen = torch.Generator().manual_seed(11)
    shape = (2, 3, 7, 97)  # (..., M, N): causal row index is dim -2
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    mask = _mask(mask_kind, shape, device, dtype, gen)
    _check_forward(x, scale=scale, mask=mask, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_are_zero(device):
    x = torch.randn(4, 40, device=device)
    mask = torch.ones(4, 40, dtype=torch.bool, device=device)
    mask[1] = False
    fmask = torch.zeros(4, 40, device=device)
    fmask[2] = float("-inf")
    y = _C_ops.softmax_forward(x, scale=1.0, mask=mask, causal=False)
    assert torch.equal(y[1], torch.zeros(40, device=device))
    y = _C_ops.softmax_forward(x, scale=1.0, mask=fmask, causal=False)
    assert torch.equal(y[2], torch.zeros(40, device=device))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.sum(-1)[[0, 1, 3]], torch.ones(3, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_causal_wide_and_tall(device):
    # M > N: rows past the last column see every column; M < N: the upper triangle is masked.
    for shape in [(1, 9, 4), (1, 4, 9)]:
        x = torch.randn(shape, device=device)
        y = _check_forward(x, scale=None, mask=None, causal=True)
        assert (y[0].triu(1) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(device, dtype):
    base = torch.randn(6, 50, 130, device=device, dtype=dtype)
    _check_forward(base[1:, 3:40, 5:105], scale=0.5, mask=None, causal=True)  # offset rows
    _check_forward(base.transpose(-1, -2)[:, :33], scale=None, mask=None, causal=False)
    mask = torch.rand(50, 130, device=device) > 0.2
    _check_forward(base[:, :, 5:105], scale=None, mask=mask[:, 5:105].expand(6, 50, 100),
                   causal=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 33), (97, 1000), (2, 4097)])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_backward(device, dtype, rows, cols, scale):
    gen = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(rows, cols, generator=gen)
    y = reference.softmax(x).to(device=device, dtype=dtype)
    dy = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
    dx = _C_ops.softmax_backward(dy, y, scale=scale)

    def formula(dy_, y_):
        return scale * y_ * (dy_ - (dy_ * y_).sum(-1, keepdim=True))

    assert dx.dtype == dtype
    assert_within_2x(dx, formula(dy.double(), y.double()).float(), formula(dy, y), name="dx")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_strided(device):
    y = torch.softmax(torch.randn(5, 64, 40, device=device), -1).transpose(0, 1)
    dy = torch.randn(64, 40, 5, device=device).permute(0, 2, 1)
    dx = _C_ops.softmax_backward(dy, y, scale=2.0)
    ref = 2.0 * y * (dy - (dy * y).sum(-1, keepdim=True))
    torch.testing.assert_close(dx, ref, **ELEMENTWISE_FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1024, 1029])
def test_large_outputs(device, dtype, cols):
    # >= 4 MiB outputs take the CPU kernels' non-temporal store path (1029: rows misaligned).
    rows = 1100 if dtype == torch.float32 else 2100
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
    y = _check_forward(x, scale=0.5, mask=None, causal=True)
    dy = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
    dx = _C_ops.softmax_backward(dy, y, scale=0.5)
    yd, dyd = y.double(), dy.double()
    ref = 0.5 * yd * (dyd - (dyd * yd).sum(-1, keepdim=True))
    pt = 0.5 * y * (dy - (dy * y).sum(-1, keepdim=True))
    assert_within_2x(dx, ref.float(), pt, name="dx")


def test_exp_range_underflow_and_special_values():
    """The kernel's own exp (csrc/cpu/fast_exp.h): relative accuracy over the whole range of
    softmax arguments, 0 where the true value underflows, exact 0 for -inf, NaN kept."""
    x = torch.linspace(-120.0, 0.0, 4001).repeat(3, 1)
    x[1, ::7] = float("-inf")
    x[2, 5] = float("nan")
    y = _C_ops.softmax_forward(x, scale=1.0, mask=None, causal=False)
    ref = torch.softmax(x[:2].double(), -1)
    big = ref > 1e-30
    torch.testing.assert_close(y[:2][big].double(), ref[big], **CPU_EXP_FP32_TOL)
    assert (y[:2][ref == 0] == 0).all() and (y[1, ::7] == 0).all()
    assert (y[:2][~big] <= 1e-30).all()
    assert torch.isnan(y[2]).all()
