"""Triton LayerNorm / RMSNorm kernels against fastattn.reference (TRITON_INTERPRET=1 on CPU).

Outputs, statistics and every gradient (dx incl. the residual stream's dh_extra, dweight, dbias)
through the backward launchers. fp16/bf16: max|out - ref| <= 2 * max|pt - ref| + floor (ref in
fp32, pt in the input dtype); fp32: tight.
"""

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.kernels._compat import interpreting

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastattn.kernels import layer_norm as tln  # noqa: E402
from tolerances import (FP32_TOL, LAYER_NORM_TRITON_FP32, LAYER_NORM_TRITON_LARGE_MEAN_ATOL,
                        ROWWISE_TRITON_FLOOR, TIGHT_FP32_TOL, assert_max_err_2x, max_err)


DEVICE = "cpu" if interpreting() else "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# rows x hidden: awkward sizes, the big ones with few rows; 4096/4097 and 8192/8193 cross the
# backward's and the forward's switch to the long-row kernels
SHAPES = [(1, 1), (7, 33), (97, 1000), (3, 4097), (2, 8193), (2, 65536)]


def assert_close(out, ref, pt, name):
    """The 2x rule (low precision) or a tight fp32 bound; ref is fp32."""
    assert_max_err_2x(out, ref, pt, name, fp32=LAYER_NORM_TRITON_FP32, floors=ROWWISE_TRITON_FLOOR)


def reference_grads(rms, x, res, w, b, eps, dy, dh):
    """(y, h, dx, dw, db) of the reference with autograd, in x's dtype (fp32 inputs give ref)."""
    x = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() if p is not None else None for p in (w, b)]
    n = x.shape[-1]
    if rms:
        out = reference.rms_norm(x, n, params[0], eps, residual=res)
    else:
        out = reference.layer_norm(x, n, params[0], params[1], eps, residual=res)
    y, h = out if res is not None else (out, x)
    loss = (y.float() * dy.float()).sum()
    if res is not None and dh is not None:
        loss = loss + (h.float() * dh.float()).sum()
    wanted = [x] + [p for p in params if p is not None]
    grads = list(torch.autograd.grad(loss, wanted))
    dx = grads.pop(0)
    dw = grads.pop(0) if w is not None else None
    db = grads.pop(0) if b is not None else None
    return y.detach(), h.detach(), dx, dw, db


def run_case(rms, m, n, dtype, *, weight=True, bias=True, residual=True, dh=True, eps=1e-5,
             seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dt).to(DEVICE)

    x = rnd(m, n, s=2.0) + 0.5
    res = rnd(m, n) if residual else None
    w = rnd(n, s=0.5) + 1.0 if weight else None
    b = rnd(n) if bias and not rms else None
    dy = rnd(m, n)
    dh_extra = rnd(m, n) if residual and dh else None

    if rms:
        y, rstd, h = tln.rms_norm_forward(x, w, eps, res)
        mean = None
    else:
        y, mean, rstd, h = tln.layer_norm_forward(x, w, b, eps, res)
    assert (h is None) == (res is None)
    h_in = h if h is not None else x
    if rms:
        dx, dw = tln.rms_norm_backward(dy, h_in, w, rstd, dh_extra)
        db = None
    else:
        dx, dw, db = tln.layer_norm_backward(dy, h_in, w, b, mean, rstd, dh_extra)

    up = (lambda t: None if t is None else t.float())
    ref = reference_grads(rms, up(x), up(res), up(w), up(b), eps, dy, dh_extra)
    pt = reference_grads(rms, x, res, w, b, eps, dy, dh_extra)
    assert_close(y, ref[0], pt[0], "y")
    if res is not None:
        assert torch.equal(h, pt[1]), "h must be x + residual in x's dtype"
    assert_close(dx, ref[2], pt[2], "dx")
    for name, got, r, p in (("dweight", dw, ref[3], pt[3]), ("dbias", db, ref[4], pt[4])):
        assert (got is None) == (p is None), name
        if got is not None:
            assert_close(got, r, p, name)

    # statistics in fp32 of the normalised h
    hf = h_in.float()
    assert rstd.dtype == torch.float32 and rstd.shape == (m,)
    if rms:
        want = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    else:
        assert mean.dtype == torch.float32 and mean.shape == (m,)
        torch.testing.assert_close(mean, hf.mean(-1), **TIGHT_FP32_TOL)
        want = torch.rsqrt(hf.var(-1, unbiased=False) + eps)
    torch.testing.assert_close(rstd, want, **FP32_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_all_options(rms, m, n, dtype):
    run_case(rms, m, n, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("opts", [
    dict(weight=False, bias=False, residual=False),
    dict(weight=True, bias=False, residual=False),
    dict(weight=False, bias=True, residual=True, dh=False),
    dict(weight=True, bias=True, residual=True, dh=False),
], ids=["plain", "weight", "bias_res", "res_no_dh"])
@pytest.mark.parametrize("m,n", [(7, 33), (3, 9000)])
def test_options(m, n, opts, rms, dtype):
    run_case(rms, m, n, dtype, seed=1, **opts)


def test_large_mean_small_variance():
    # the long-row path's shifted sums must not lose the variance to cancellation
    x = (1000.0 + torch.randn(2, 10000)).to(DEVICE)
    y, mean, rstd, _ = tln.layer_norm_forward(x, None, None, 1e-5, None)
    want = reference.layer_norm(x.double(), 10000, None, None, 1e-5)
    assert max_err(y, want) < LAYER_NORM_TRITON_LARGE_MEAN_ATOL


def test_rms_default_eps_and_row_strides():
    x = torch.randn(6, 40, device=DEVICE)[::2]          # row stride 80, unit column stride
    y, rstd, _ = tln.rms_norm_forward(x, None, None, None)
    torch.testing.assert_close(y, reference.rms_norm(x, 40, None, None), **TIGHT_FP32_TOL)


def test_bad_input():
    # arguments are validated once, by fastattn.layer_norm / rms_norm; the launchers only assert
    x = torch.randn(4, 8, device=DEVICE)
    with fastattn.use_backend("triton"):
        with pytest.raises(ValueError, match="input"):
            fastattn.layer_norm(x.int(), (8,))
        with pytest.raises(ValueError, match="normalized_shape"):
            fastattn.layer_norm(x, (7,))
        with pytest.raises(ValueError, match="weight"):
            fastattn.layer_norm(x, (8,), torch.ones(7, device=DEVICE))
        with pytest.raises(ValueError, match="residual"):
            fastattn.rms_norm(x, (8,), residual=torch.ones(4, 9, device=DEVICE))


def test_unsupported_and_static_variants():
    assert tln.unsupported("layer_norm_forward", dtype=torch.bfloat16, device=DEVICE) is None
    assert "dtype" in tln.unsupported("rms_norm_backward", dtype=torch.float64)
    for arch in (80, 90):
        vs = tln.static_variants(arch)
        fwd = {(v.constexprs["BLOCK_N"], v.constexprs["BLOCK_M"], v.num_warps,
                v.constexprs["LOOP"]) for v in vs if v.name == "ln_fwd"}
        bwd = {(v.constexprs["BLOCK_N"], v.constexprs["BLOCK_M"], v.num_warps, False)
               for v in vs if v.name == "rms_bwd"}
        for n in (1, 33, 1000, 4097, 8193, 65536):
            assert tln._tile(n, tln.FWD_TILES) in fwd
            b = tln._tile(n, tln.BWD_TILES)
            assert b[3] or b in bwd
        assert {"ln_bwd_stats", "ln_bwd_dx", "rms_bwd_stats", "rms_bwd_dx"} <= {v.name for v in vs}
