"""Seeded random-configuration fuzz of fastattn.layer_norm and fastattn.rms_norm against
float64 oracles written from the math: outputs (and the fused residual sum) and the gradients
of input, weight, bias and residual, on every backend.

Random: hidden sizes that break kernels (1, 33, 1000, 4097, ...), one or two normalised dims,
rows 0-~1000, strided/permuted/padded views of input and residual, with/without weight, bias,
residual, eps (None for rms_norm: finfo(dtype).eps), large offsets (mean >> std: the variance
must not cancel), large and tiny magnitudes, fp16/bf16/fp32.
Configs per test: $FASTATTN_FUZZ_CONFIGS (default below); base seed $FASTATTN_FUZZ_SEED
(tests/fuzz_support.py).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fuzz_support import (FUZZ_BACKENDS, check, pick_dtype, run_fuzz, strided_copy)

import fastattn

HIDDEN = (1, 2, 7, 33, 64, 97, 256, 1000, 1025, 4097)
DEFAULT_CONFIGS = {"cpu": 100, "torch": 40, "triton": 24, "cuda": 100}
MAX_ELEMENTS = {"cpu": 1 << 16, "torch": 1 << 15, "triton": 1 << 13, "cuda": 1 << 16}
MAX_ROWS = {"cpu": 2048, "torch": 2048, "triton": 12, "cuda": 2048}


def norm_math(kind, h, nshape, weight, bias, eps):
    """The norm of h over its trailing dims `nshape` in h's dtype (float64: the oracle):
    layer_norm (h - mean) / sqrt(var + eps) * w + b (biased variance), rms_norm
    h / sqrt(mean(h^2) + eps) * w."""
    dims = tuple(range(h.dim() - len(nshape), h.dim()))
    if kind == "layer_norm":
        mean = h.mean(dims, keepdim=True)
        var = (h - mean).square().mean(dims, keepdim=True)
        y = (h - mean) / torch.sqrt(var + eps)
    else:
        y = h / torch.sqrt(h.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def conditioning(kind, h, nshape, eps):
    """1 + max over rows of |mean| / sqrt(var + eps) for layer_norm (how many ulps of the row's
    magnitude the cancellation in h - mean costs, relative to the spread; huge for one-element
    rows, whose output is the bias alone); 1 for rms_norm (no cancellation)."""
    if kind != "layer_norm" or h.numel() == 0:
        return 1.0
    h = h.double()
    dims = tuple(range(h.dim() - len(nshape), h.dim()))
    mean = h.mean(dims)
    var = (h - mean.view(mean.shape + (1,) * len(nshape))).square().mean(dims)
    return 1.0 + (mean.abs() / torch.sqrt(var + (eps or 0.0))).max().item()


def grad_scales(kind, h, nshape, w, dy, dh, eps):
    """The magnitude of the terms each gradient is made of (float64), for the fp32 floor:
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) (+ dh) cancels to ~0 for one-element
    rows, where rounding g differently in two passes still leaves rstd * ulp(g); dweight and
    dbias are sums over rows of dy * x_hat and dy."""
    if h.numel() == 0:
        return {"dx": 0.0, "dresidual": 0.0, "dweight": 0.0, "dbias": 0.0}
    rows = h.double().reshape(-1, math.prod(nshape))
    g = dy.double().reshape(rows.shape) * (w.double().reshape(-1) if w is not None else 1.0)
    mean = rows.mean(-1, keepdim=True) if kind == "layer_norm" else 0.0
    rstd = 1.0 / torch.sqrt((rows - mean).square().mean(-1, keepdim=True) + eps)
    xhat = (rows - mean) * rstd
    dx = (rstd * g.abs()).max().item() + (dh.double().abs().max().item() if dh is not None
                                          else 0.0)
    d = dy.double().reshape(rows.shape).abs()
    return {"dx": dx, "dresidual": dx, "dweight": (d * xhat.abs()).sum(0).max().item(),
            "dbias": d.sum(0).max().item()}


def pytorch_norm(kind, h, nshape, weight, bias, eps):
    """PyTorch's own op in the input dtype (pt)."""
    if kind == "layer_norm":
        return F.layer_norm(h, nshape, weight, bias, eps)
    return F.rms_norm(h, nshape, weight, eps)


def draw(kind, rng, gen, device, backend, cfg):
    dtype = pick_dtype(rng)
    two_dims = rng.random() < 0.2
    hidden = rng.choice(HIDDEN)
    nshape = (rng.choice((2, 3, 5)), max(1, hidden // 4)) if two_dims else (hidden,)
    if rng.random() < 0.03:
        nshape = nshape[:-1] + (0,)                         # zero-size normalised dim
    lead = [rng.choice((1, 2, 3, 5, 7, 16, 64, 333)) for _ in range(rng.choice((0, 1, 1, 2)))]
    if rng.random() < 0.03 and lead:
        lead[0] = 0                                          # no rows
    n = math.prod(nshape)
    while lead and (math.prod(lead) * n > MAX_ELEMENTS[backend]
                    or math.prod(lead) > MAX_ROWS[backend]):
        i = rng.randrange(len(lead))
        lead[i] = max(1, lead[i] // 2)
        if all(s == 1 for s in lead):
            break
    shape = tuple(lead) + nshape
    offset = rng.choice((0.0, 0.0, 0.0, 50.0, -300.0))      # mean >> std
    mag = rng.choice((1.0, 1.0, 0.01, 30.0))
    x = (torch.randn(shape, generator=gen) * mag + offset).to(dtype).to(device)
    affine = rng.random() < 0.8
    w = (torch.randn(nshape, generator=gen) * 0.5 + 1).to(dtype).to(device) if affine else None
    b = None
    if kind == "layer_norm" and affine and rng.random() < 0.7:
        b = (torch.randn(nshape, generator=gen) * 0.5).to(dtype).to(device)
    r = None
    if rng.random() < 0.35:
        r = (torch.randn(shape, generator=gen) * mag).to(dtype).to(device)
    if kind == "rms_norm":
        eps = rng.choice((None, 1e-6, 1e-5, 1e-2))
    else:
        eps = rng.choice((1e-5, 1e-6, 1e-3, 0.5))
    cfg.update(shape=shape, normalized_shape=nshape, dtype=str(dtype).replace("torch.", ""),
               weight=w is not None, bias=b is not None, residual=r is not None, eps=eps,
               offset=offset, magnitude=mag)
    return x, nshape, w, b, r, eps


def one_config(kind, backend):
    def run(rng, gen, device, cfg):
        x, nshape, w, b, r, eps = draw(kind, rng, gen, device, backend, cfg)
        xs = strided_copy(x, rng).requires_grad_()
        rs = None if r is None else strided_copy(r, rng).requires_grad_()
        ws = None if w is None else w.clone().requires_grad_()
        bs = None if b is None else b.clone().requires_grad_()
        cfg["x_strides"] = xs.stride()
        fn = fastattn.layer_norm if kind == "layer_norm" else fastattn.rms_norm
        args = (xs, nshape, ws, bs, eps) if kind == "layer_norm" else (xs, nshape, ws, eps)
        out = fn(*args, residual=rs)
        y, h = out if r is not None else (out, None)
        dy = torch.randn(x.shape, generator=gen).to(x.dtype).to(device)
        dh = torch.randn(x.shape, generator=gen).to(x.dtype).to(device) if r is not None \
            else None
        names = ["dx", "dresidual", "dweight", "dbias"]
        leaves = [xs, rs, ws, bs]

        def grads_of(outputs, gouts, lv):
            present = [t for t in lv if t is not None]
            pairs = [(o, g) for o, g in zip(outputs, gouts) if o is not None]
            if not present or all(o.numel() == 0 for o, _ in pairs):
                gs = [torch.zeros_like(t) for t in present]
            else:
                gs = torch.autograd.grad([o for o, _ in pairs], present, [g for _, g in pairs],
                                         allow_unused=True)
                gs = [torch.zeros_like(t) if g is None else g for t, g in zip(present, gs)]
            it = iter(gs)
            return [None if t is None else next(it) for t in lv]

        got = grads_of([y, h], [dy, dh], leaves)
        results = {}
        for name, dt in (("ref", torch.float64), ("pt", x.dtype)):
            lv = [None if t is None else t.detach().to(dt).requires_grad_() for t in (x, r, w, b)]
            hh = lv[0] if r is None else lv[0] + lv[1]
            if r is not None and dt == torch.float64:
                # the op's semantics: h = input + residual is returned in the input dtype and
                # that h is normalised (as PyTorch's x + r then norm): round h's value, pass
                # its gradient straight through
                hh = hh + (hh.detach().to(x.dtype).double() - hh.detach())
            e = torch.finfo(x.dtype).eps if eps is None else eps   # None: the input's eps
            if name == "ref":
                yy = norm_math(kind, hh, nshape, lv[2], lv[3], e)
            else:
                yy = pytorch_norm(kind, hh, nshape, lv[2], lv[3], e)
            gl = [None if g is None else g.to(dt) for g in (dy, dh)]
            results[name] = ((yy, hh if r is not None else None),
                             grads_of([yy, hh if r is not None else None], gl, lv))
        failures = []
        (ref_out, ref_g), (pt_out, pt_g) = results["ref"], results["pt"]
        hr = x if r is None else (x + r)
        e = torch.finfo(x.dtype).eps if eps is None else eps
        cond = conditioning(kind, hr, nshape, e)
        scales = grad_scales(kind, hr, nshape, w, dy, dh, e)
        check("y", y, ref_out[0], pt_out[0], cfg, failures, cond)
        if r is not None:
            check("h", h, ref_out[1], pt_out[1], cfg, failures)
        for nm, g, rg, pg in zip(names, got, ref_g, pt_g):
            if g is not None:
                check(nm, g, rg, pg, cfg, failures, cond, scales[nm])
        return failures
    return run


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
def test_fuzz_layer_norm(backend):
    run_fuzz("layer_norm", backend, DEFAULT_CONFIGS[backend], one_config("layer_norm", backend))


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
def test_fuzz_rms_norm(backend):
    run_fuzz("rms_norm", backend, DEFAULT_CONFIGS[backend], one_config("rms_norm", backend))
