"""Seeded random-configuration fuzz of fastattn.softmax against a float64 oracle written from
the math: outputs and the gradients of x and of a float mask, on every backend.

Random: rank 1-4, the softmax dim anywhere, row lengths that break kernels (1, 7, 33, 1000,
1025, 4097, ...), strided/permuted/padded views, bool and float masks broadcast from smaller
shapes (with -inf entries and fully masked rows, which must give 0), causal, scale (0, negative,
fractional), huge logits (~1e9: the max column must keep exp(0) = 1), fp16/bf16/fp32.
Configs per test: $FASTATTN_FUZZ_CONFIGS (default below); base seed $FASTATTN_FUZZ_SEED
(tests/fuzz_support.py).
"""

import math

import pytest
import torch

from fuzz_support import (FUZZ_BACKENDS, check, pick_dtype, run_fuzz, strided_copy)

import fastattn

ROW_LENGTHS = (1, 2, 7, 16, 33, 97, 129, 1000, 1025, 4097)
OTHER_SIZES = (1, 2, 3, 5, 7, 16)
# Default configs per backend: sized for the suite (the interpreter runs a program per row).
DEFAULT_CONFIGS = {"cpu": 150, "torch": 50, "triton": 30, "cuda": 150}
MAX_ELEMENTS = {"cpu": 1 << 16, "torch": 1 << 15, "triton": 1 << 13, "cuda": 1 << 16}
MAX_ROWS = {"cpu": 1 << 12, "torch": 1 << 12, "triton": 12, "cuda": 1 << 12}


def softmax_math(x, dim, scale, mask, causal, *, use_torch_softmax):
    """softmax(x * scale + mask) over dim with causal (column j > row i of dims -2/-1 masked);
    a row with nothing kept is 0. float64 inputs: the oracle (explicit exp / sum); the input
    dtype with use_torch_softmax: PyTorch's computation (pt)."""
    s = x * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    if causal:
        rows, cols = s.shape[-2], s.shape[-1]
        above = torch.ones(rows, cols, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(above, -math.inf)
    if s.numel() == 0:
        return s * 0                                         # empty in, empty out
    dead = (s == -math.inf).all(dim, keepdim=True)          # every column masked
    s = s.masked_fill(dead, 0.0)
    if use_torch_softmax:
        p = torch.softmax(s, dim)
    else:
        e = (s - s.amax(dim, keepdim=True)).exp()
        p = e / e.sum(dim, keepdim=True)
    return p.masked_fill(dead, 0.0)


def draw(rng, gen, device, backend, cfg):
    dtype = pick_dtype(rng)
    ndim = rng.choice((1, 2, 2, 3, 3, 4))
    causal = ndim >= 2 and rng.random() < 0.25
    dim = ndim - 1 if causal or rng.random() < 0.6 else rng.randrange(-ndim, ndim)
    shape = [rng.choice(OTHER_SIZES) for _ in range(ndim)]
    shape[dim % ndim] = rng.choice(ROW_LENGTHS)
    if rng.random() < 0.03:
        shape[rng.randrange(ndim)] = 0                         # empty tensor
    # keep the config small enough: shrink the non-softmax dims first
    while (math.prod(shape) > MAX_ELEMENTS[backend]
           or math.prod(shape) // max(shape[dim % ndim], 1) > MAX_ROWS[backend]):
        others = [d for d in range(ndim) if d != dim % ndim and shape[d] > 1]
        d = rng.choice(others) if others else dim % ndim
        shape[d] = max(1, shape[d] // 2)
    huge = rng.random() < 0.12
    if huge:       # logits ~1e9 (fp16: ~8e3, 4.5 sigma < 65504): one-hot rows
        mag = 8e3 if dtype == torch.float16 else 1e9
        scale = rng.choice((1.0, 0.5, 0.3) if dtype == torch.float16 else (1.0, 3.0, 0.3, 0.125))
    else:
        mag = rng.choice((1.0, 3.0, 10.0))
        scale = rng.choice((1.0, 1.0, 0.125, 0.3, 1.7, -0.7, 0.0))
    x = (torch.randn(shape, generator=gen) * mag).to(dtype).to(device)

    mask_kind = rng.choice((None, None, "bool", "float"))
    mask = None
    if mask_kind is not None:
        # broadcastable: each dim full or 1, maybe fewer leading dims
        mshape = [s if rng.random() < 0.6 else 1 for s in shape]
        mshape = mshape[rng.randrange(0, ndim):] if rng.random() < 0.3 else mshape
        if mask_kind == "bool":
            mask = torch.rand(mshape, generator=gen) < rng.choice((0.3, 0.7, 0.95))
        else:
            mask = torch.randn(mshape, generator=gen) * 2
            mask = mask.masked_fill(torch.rand(mshape, generator=gen) < 0.2, -math.inf)
        if mask.dim() >= 1 and mask.numel() and rng.random() < 0.5:
            # fully masked rows: every column of some rows (along the softmax dim)
            mdim = dim % ndim - (ndim - mask.dim())
            if 0 <= mdim < mask.dim():
                idx = [slice(None)] * mask.dim()
                if mask.dim() > 1:
                    other = rng.choice([d for d in range(mask.dim()) if d != mdim])
                    idx[other] = slice(0, 1)
                mask[tuple(idx)] = False if mask_kind == "bool" else -math.inf
        mask = mask.to(device) if mask_kind == "bool" else mask.to(dtype).to(device)
    mask_grad = mask_kind == "float" and rng.random() < 0.5
    cfg.update(shape=tuple(shape), dim=dim, dtype=str(dtype).replace("torch.", ""),
               causal=causal, scale=scale, huge=huge, mask=mask_kind,
               mask_shape=None if mask is None else tuple(mask.shape), mask_grad=mask_grad)
    return x, dim, scale, mask, causal, mask_grad


def one_config(backend):
    def run(rng, gen, device, cfg):
        x, dim, scale, mask, causal, mask_grad = draw(rng, gen, device, backend, cfg)
        xs = strided_copy(x, rng).requires_grad_()
        ms = None
        if mask is not None:
            ms = strided_copy(mask, rng)
            if mask_grad:
                ms.requires_grad_()
        cfg["x_strides"] = xs.stride()
        y = fastattn.softmax(xs, dim, scale=scale, mask=ms, causal=causal)
        dy = torch.randn(x.shape, generator=gen).to(x.dtype).to(device)
        leaves = [xs] + ([ms] if mask_grad else [])
        grads = torch.autograd.grad(y, leaves, dy) if y.numel() else [torch.zeros_like(t)
                                                                      for t in leaves]
        # oracle (float64) and PyTorch in the input dtype, with their gradients
        results = {}
        for name, dt, torch_sm in (("ref", torch.float64, False), ("pt", x.dtype, True)):
            xr = x.detach().to(dt).requires_grad_()
            mr = None
            if mask is not None:
                mr = mask.detach() if mask.dtype == torch.bool else mask.detach().to(dt)
                mr.requires_grad_(mask_grad)
            out = softmax_math(xr, dim, scale, mr, causal, use_torch_softmax=torch_sm)
            lv = [xr] + ([mr] if mask_grad else [])
            g = (torch.autograd.grad(out, lv, dy.to(dt)) if out.numel()
                 else [torch.zeros_like(t) for t in lv])
            results[name] = (out, g)
        failures = []
        (ref, ref_g), (pt, pt_g) = results["ref"], results["pt"]
        check("y", y, ref, pt, cfg, failures)
        check("dx", grads[0], ref_g[0], pt_g[0], cfg, failures)
        if mask_grad:
            check("dmask", grads[1], ref_g[1], pt_g[1], cfg, failures)
        return failures
    return run


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
def test_fuzz_softmax(backend):
    run_fuzz("softmax", backend, DEFAULT_CONFIGS[backend], one_config(backend))
