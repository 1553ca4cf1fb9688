"""Triton softmax kernels against fastattn.reference.softmax (run with TRITON_INTERPRET=1 on CPU).

fp16/bf16: max|out - ref| <= 2 * max|pt - ref| + floor (ref in fp32, pt in the input dtype);
fp32: tight.
"""

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.kernels._compat import interpreting

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastattn.kernels import softmax as tsm  # noqa: E402
from tolerances import (SOFTMAX_TRITON_BACKWARD_FP32_ATOL, SOFTMAX_TRITON_FLOOR,
                        SOFTMAX_TRITON_FP32, assert_max_err_2x, max_err)

DEVICE = "cpu" if interpreting() else "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def assert_close(out, ref, pt, name):
    """The 2x rule (low precision) or a tight fp32 bound; ref is fp32."""
    assert_max_err_2x(out, ref, pt, name, fp32=SOFTMAX_TRITON_FP32, floors=SOFTMAX_TRITON_FLOOR)


def ref_backward(dy, y, scale):
    return scale * y * (dy - (dy * y).sum(-1, keepdim=True))


def check(x, *, scale=None, mask=None, causal=False):
    """Forward and backward of the kernels against the reference in fp32 and in x's dtype."""
    y = tsm.softmax_forward(x, scale=scale, mask=mask, causal=causal)
    assert y.shape == x.shape and y.dtype == x.dtype
    fmask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    ref = reference.softmax(x.float(), scale=scale, mask=fmask, causal=causal)
    # a float mask of another dtype promotes; the output is always in x's dtype
    pt = reference.softmax(x, scale=scale, mask=mask, causal=causal).to(x.dtype)
    assert_close(y, ref, pt, "y")

    dy = torch.randn_like(x)
    s = 1.0 if scale is None else scale
    dx = tsm.softmax_backward(dy, y, scale=scale)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, ref_backward(dy.float(), y.float(), s), ref_backward(dy, y, s), "dx")
    return y, dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (97, 1000), (2, 3, 7, 129), (3, 4097),
                                   (1, 8192), (2, 8193)])
def test_plain(shape, dtype):
    torch.manual_seed(0)
    check(torch.randn(shape, dtype=dtype, device=DEVICE) * 3, scale=0.7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [65536, 70001])
def test_long_rows(n, dtype):
    # online (multi-block) pass; a wide spread of values so the running max moves
    torch.manual_seed(1)
    x = torch.randn(2, n, dtype=dtype, device=DEVICE) * 4
    x[0, -5] = 30.0                      # the max sits in the last block
    check(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", [(7, 7), (5, 33), (40, 9), (3, 9000)])
def test_causal(m, n, dtype):
    torch.manual_seed(2)
    y, _ = check(torch.randn(2, m, n, dtype=dtype, device=DEVICE), scale=1.3, causal=True)
    cols = torch.arange(n, device=DEVICE)
    rows = torch.arange(m, device=DEVICE)[:, None]
    assert (y[:, cols > rows] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [33, 9000])
def test_bool_mask_broadcast_and_fully_masked(n, dtype):
    torch.manual_seed(3)
    b, h, m = 2, 3, 5
    x = torch.randn(b, h, m, n, dtype=dtype, device=DEVICE)
    # key-padding style mask (B, 1, 1, N) expanded: stride 0 over heads and rows
    keep = torch.rand(b, 1, 1, n, device=DEVICE) > 0.3
    keep[1] = False                                # batch 1: every row fully masked
    mask = keep.expand(b, h, m, n)
    assert mask.stride(1) == 0 and mask.stride(2) == 0
    y, dx = check(x, mask=mask)
    assert (y[1] == 0).all() and (dx[1] == 0).all()
    # a per-row mask with one fully masked row, combined with causal
    keep2 = torch.rand(b, h, m, n, device=DEVICE) > 0.5
    keep2[0, 1, 2] = False
    y, _ = check(x, mask=keep2, causal=True, scale=0.5)
    assert (y[0, 1, 2] == 0).all() and not y.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [97, 8500])
def test_float_mask(n, dtype):
    torch.manual_seed(4)
    x = torch.randn(2, 4, 3, n, dtype=dtype, device=DEVICE)
    bias = torch.randn(1, 4, 3, n, dtype=dtype, device=DEVICE)
    bias[0, 2, 1] = float("-inf")                 # a row whose float scores are all -inf
    bias[0, 0, 0, ::2] = float("-inf")
    y, dx = check(x, mask=bias.expand_as(x), scale=0.3)
    assert (y[:, 2, 1] == 0).all() and (dx[:, 2, 1] == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64])
def test_float_mask_other_dtype(mask_dtype):
    torch.manual_seed(5)
    x = torch.randn(3, 7, 50, dtype=torch.float16, device=DEVICE)
    check(x, mask=torch.randn(3, 7, 50, dtype=mask_dtype, device=DEVICE))
    # a broadcast mask of another dtype
    check(x, mask=torch.randn(3, 1, 50, dtype=mask_dtype, device=DEVICE).expand(3, 7, 50))


def test_non_contiguous_inputs():
    torch.manual_seed(6)
    x = torch.randn(40, 6, 3, device=DEVICE).transpose(0, 2)        # (3, 6, 40), strided
    mask = (torch.rand(40, 6, 3, device=DEVICE) > 0.2).transpose(0, 2)
    y, _ = check(x, mask=mask, causal=True)
    assert y.is_contiguous()
    y = tsm.softmax_forward(x)
    dy = torch.randn(3, 40, 6, device=DEVICE).transpose(1, 2)
    dx = tsm.softmax_backward(dy, y, scale=2.0)
    assert_close(dx, ref_backward(dy, y, 2.0), ref_backward(dy, y, 2.0), "dx strided")


def test_gradient_matches_autograd():
    # the backward formula against autograd through the reference
    torch.manual_seed(7)
    x = torch.randn(4, 6, 70, dtype=torch.float64, device=DEVICE).requires_grad_()
    keep = torch.rand(4, 6, 70, device=DEVICE) > 0.3
    y_ref = reference.softmax(x, scale=0.8, mask=keep, causal=True)
    dy = torch.randn_like(y_ref)
    (gx,) = torch.autograd.grad(y_ref, x, dy)
    y = tsm.softmax_forward(x.detach().float(), scale=0.8, mask=keep, causal=True)
    dx = tsm.softmax_backward(dy.float(), y, scale=0.8)
    assert max_err(dx, gx) < SOFTMAX_TRITON_BACKWARD_FP32_ATOL


def test_empty_and_bad_input():
    assert tsm.softmax_forward(torch.empty(0, 5, device=DEVICE)).shape == (0, 5)
    # arguments are validated once, by fastattn.softmax; the launchers only assert
    with fastattn.use_backend("triton"):
        with pytest.raises(ValueError, match="x"):
            fastattn.softmax(torch.ones(3, 4, dtype=torch.int32, device=DEVICE))
        with pytest.raises(ValueError, match="mask"):
            fastattn.softmax(torch.ones(3, 4, device=DEVICE),
                             mask=torch.ones(3, 5, dtype=torch.bool, device=DEVICE))


def test_unsupported_and_static_variants():
    assert tsm.unsupported("softmax_forward", dtype=torch.float16, device=DEVICE) is None
    assert "dtype" in tsm.unsupported("softmax_forward", dtype=torch.float64)
    for arch in (80, 90):
        vs = tsm.static_variants(arch)
        names = {v.name for v in vs}
        assert names == {"softmax_fwd", "softmax_bwd"}
        # every block the launcher can pick is among the variants
        picked = {tsm._block_config(n) for n in (1, 129, 1000, 4097, 8192, 65536)}
        have = {(v.constexprs["BLOCK_N"], v.num_warps, v.constexprs["LOOP"]) for v in vs}
        assert picked <= have
