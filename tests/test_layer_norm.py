"""fastattn.layer_norm / rms_norm on every backend against the reference, with residual."""

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_device
from tolerances import TIGHT_FP32_TOL, assert_within_2x

import fastattn
from fastattn import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_norm(kind, x, w, b, r, eps, dtype=None):
    """fastattn (dtype None) or the reference in `dtype`; returns outputs and leaf inputs."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()
              for t in (x, w, b, r)]
    xx, ww, bb, rr = leaves
    n = x.shape[-1]
    if kind == "layer_norm":
        fn = fastattn.layer_norm if dtype is None else reference.layer_norm
        res = fn(xx, (n,), ww, bb, eps, residual=rr) if dtype is None else \
            fn(xx, (n,), ww, bb, eps, rr)
    else:
        fn = fastattn.rms_norm if dtype is None else reference.rms_norm
        res = fn(xx, (n,), ww, eps, residual=rr) if dtype is None else fn(xx, (n,), ww, eps, rr)
    outs = list(res) if isinstance(res, tuple) else [res]
    return outs, [t for t in leaves if t is not None]


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (7, 33), (97, 1000), (3, 4097), (2, 65536)])
@pytest.mark.parametrize("residual", [False, True])
def test_parity(backend, kind, dtype, rows, n, residual):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, n, generator=g).to(dev, dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dev, dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(dev, dtype) if kind == "layer_norm" else None
    r = torch.randn(rows, n, generator=g).to(dev, dtype) if residual else None
    eps = 1e-5
    outs, leaves = run_norm(kind, x, w, b, r, eps)
    refs, ref_leaves = run_norm(kind, x, w, b, r, eps, torch.float32)
    pts, pt_leaves = run_norm(kind, x, w, b, r, eps, dtype)
    for o, rf, p in zip(outs, refs, pts):
        assert_within_2x(o, rf, p, name="y")
    # from the test's own generator: the result must not depend on which tests ran before
    grads_out = [torch.randn(o.shape, generator=g).to(dev, o.dtype) for o in outs]
    ours = torch.autograd.grad(outs, leaves, grads_out)
    theirs = torch.autograd.grad(refs, ref_leaves, [gg.float() for gg in grads_out])
    lowp = torch.autograd.grad(pts, pt_leaves, grads_out)
    for name, a, rf, p in zip(("dx", "dw", "db/dres", "dres"), ours, theirs, lowp):
        assert_within_2x(a, rf, p, name=name)


def test_no_weight_and_3d_input(backend):
    dev = backend_device(backend)
    x = torch.randn(2, 5, 3, 8, device=dev)
    torch.testing.assert_close(fastattn.layer_norm(x, (3, 8)), F.layer_norm(x, (3, 8)),
                               **TIGHT_FP32_TOL)
    torch.testing.assert_close(fastattn.rms_norm(x, (8,)), F.rms_norm(x, (8,)),
                               **TIGHT_FP32_TOL)


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="normalized_shape"):
        fastattn.layer_norm(x, (7,))
    with pytest.raises(ValueError, match="weight"):
        fastattn.rms_norm(x, (8,), torch.ones(7))
    with pytest.raises(ValueError, match="input must have a floating dtype"):
        fastattn.layer_norm(x.long(), (8,))
    with pytest.raises(ValueError, match="residual"):
        fastattn.layer_norm(x, (8,), residual=torch.randn(3, 8))
