"""Seeded random-configuration fuzz of fastattn.linear against a float64 oracle written from
the math: the output and the gradients of input, weight and bias, on the cpu, torch and auto
backends.

Random: rows 1-20 (both sides of the cpu kernel's 16-row limit), factorised into 0-3 leading
dims (a 1-D input, (B, S, K), (B, 1, K), ...), in_features 1-1500, out_features 1-300 (sizes
that break kernels half the time: 1, 3, 15, 17, 1025, ..., not multiples of 4 or 16), bias or
not, empty tensors, strided/permuted/padded views of input, weight (w.t() of a (K, N) tensor,
row slices) and bias, magnitudes from tiny (1e-30; fp16: its smallest normals) to huge (values
up to ~4e4; fp16 ~4e3), fp16/bf16/fp32. The cpu backend refuses more than 16 rows: there the
config checks the RuntimeError. Each config also checks that the no-grad call (on cpu the C++
eager fast path) is bitwise the grad call, and which backend ran.

Bounds (tests/tolerances.py, derived there): fp32 elementwise within gamma_{k+1} of the sum's
terms (sum_k |x_rk w_nk| + |b_n| for the output, and likewise for each gradient with its own
reduction length: out_features for dinput, rows for dweight and dbias), so the bound scales
with the magnitudes and holds where terms cancel; fp16/bf16 the 2x rule against F.linear in the
dtype, with 2x that fp32 bound as the floor. Configs per test: $FASTATTN_FUZZ_CONFIGS (default
below); base seed $FASTATTN_FUZZ_SEED (tests/fuzz_support.py).
"""

import pytest
import torch
import torch.nn.functional as F

from fuzz_support import comparable, pick_dtype, run_fuzz, strided_copy
from tolerances import LOW_PRECISION, dot_fp32_bound, linear_lowp_floor, max_err

import fastattn

K_SIZES = (1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 97, 129, 512, 1000, 1025, 1376, 1500)
N_SIZES = (1, 2, 3, 4, 5, 7, 8, 9, 130, 257, 300)
# the cpu kernel's row limit per dtype (fastattn.linear's docstring)
MAX_ROWS = {torch.float32: 16, torch.float16: 8, torch.bfloat16: 4}
# triton and cuda have no linear kernel (tests/test_linear.py checks that they refuse it);
# auto is fuzzed for its choice between the cpu kernel and the torch backend.
BACKENDS = ("cpu", "torch", "auto")
# Default configs per backend: sized for the suite (`make fuzz` runs 1000 each).
DEFAULT_CONFIGS = {"cpu": 150, "torch": 60, "auto": 60}


def linear_math(x, w, b, dy):
    """The oracle, float64, as sums of products (no matmul, independent of fastattn.reference
    and of autograd): x (R, K), w (N, K), b (N,) or None, dy (R, N). Returns y, dx, dw, db and
    the terms of each sum (sum of |products|) for the bounds."""
    p = x[:, None, :] * w[None, :, :]                              # (R, N, K)
    y, y_terms = p.sum(-1), p.abs().sum(-1)
    if b is not None:
        y, y_terms = y + b, y_terms + b.abs()
    px = dy[:, :, None] * w[None, :, :]                            # (R, N, K) summed over N
    pw = dy[:, :, None] * x[:, None, :]                            # (R, N, K) summed over R
    return {"y": (y, y_terms), "dinput": (px.sum(1), px.abs().sum(1)),
            "dweight": (pw.sum(0), pw.abs().sum(0)),
            "dbias": (dy.sum(0), dy.abs().sum(0)) if b is not None else None}


def check_sum(name, out, ref, terms, k, pt, failures):
    """out (fastattn) against ref (the float64 oracle) for sums of k products with |terms|;
    pt: F.linear's result in the input dtype."""
    if not comparable(name, out, ref, failures):
        return
    if out.dtype in LOW_PRECISION:
        err, pt_err = max_err(out, ref), max_err(pt, ref)
        bound = 2 * pt_err + linear_lowp_floor(k, terms)
        if not err <= bound:
            failures.append(f"{name}: max err {err:.3g} > bound {bound:.3g} (pt err "
                            f"{pt_err:.3g}, max terms {terms.max().item():.3g})")
        return
    err = (out.double() - ref).abs()
    bound = dot_fp32_bound(k, terms)
    if not (err <= bound).all():
        i = int((err - bound).flatten().argmax())
        failures.append(f"{name}: err {err.flatten()[i].item():.3g} > k={k} sum bound "
                        f"{bound.flatten()[i].item():.3g} (terms {terms.flatten()[i].item():.3g}, "
                        f"{int((err > bound).sum())} elements over)")


def _size(rng, sizes, top):
    return rng.choice(sizes) if rng.random() < 0.5 else rng.randint(1, top)


def _leading(rng, rows):
    """rows as 0-3 leading dims in a random factorisation (0 dims: a 1-D input, rows 1)."""
    if rows == 1 and rng.random() < 0.25:
        return ()
    if rows == 0:
        return rng.choice(((0,), (2, 0), (0, 3)))
    dims, rest = [], rows
    for _ in range(rng.choice((0, 1, 1, 2))):
        d = rng.choice([d for d in range(1, rest + 1) if rest % d == 0])
        dims.append(d)
        rest //= d
    dims.append(rest)
    rng.shuffle(dims)
    return tuple(dims)


def _magnitudes(rng, dtype):
    """(kind, input scale, weight scale). Huge: values up to ~4e4 (fp16: inputs up to ~4e3
    against weights ~1e-2, so the outputs and weight gradients stay below 65504); tiny: 1e-30
    against 1 (the products 1e-30, far from fp32's subnormals; fp16: 1e-4, its smallest
    normals, against 1e-2)."""
    kind = rng.choice(("normal", "normal", "normal", "huge", "tiny"))
    if kind == "huge":
        xs, ws = (1e3, 1e-2) if dtype == torch.float16 else (1e4, rng.choice((1.0, 1e4)))
    elif kind == "tiny":
        xs, ws = (1e-4, 1e-2) if dtype == torch.float16 else (1e-30, 1.0)
    else:
        xs, ws = rng.choice((0.5, 1.0, 3.0)), rng.choice((1.0, 0.1, 0.03))
    if rng.random() < 0.5 and dtype != torch.float16:
        xs, ws = ws, xs                                 # the big (or tiny) side is the weight
    return kind, xs, ws


def draw(rng, gen, cfg):
    dtype = pick_dtype(rng)
    rows = rng.randint(1, 20)
    k, n = _size(rng, K_SIZES, 1500), _size(rng, N_SIZES, 300)
    r = rng.random()
    if r < 0.02:
        rows = 0                                        # empty tensors
    elif r < 0.04:
        n = 0
    elif r < 0.06:
        k = 0
    lead = _leading(rng, rows)
    bias = rng.random() < 0.5
    kind, xs, ws = _magnitudes(rng, dtype)
    x = (torch.randn(*lead, k, generator=gen) * xs).to(dtype)
    w = (torch.randn(n, k, generator=gen) * ws).to(dtype)
    b = (torch.randn(n, generator=gen) * xs * ws).to(dtype) if bias else None
    cfg.update(lead=lead, rows=rows, k=k, n=n, bias=bias, dtype=str(dtype).replace("torch.", ""),
               magnitude=kind, x_scale=xs, w_scale=ws)
    return x, w, b


def one_config(backend):
    def run(rng, gen, device, cfg):
        x, w, b = draw(rng, gen, cfg)
        x, w = x.to(device), w.to(device)
        rows, k, n = cfg["rows"], cfg["k"], cfg["n"]
        limit = MAX_ROWS[x.dtype]
        if backend == "cpu" and rows > limit:
            try:
                fastattn.linear(x, w, b)
            except RuntimeError as exc:
                return [] if f"more than {limit} rows" in str(exc) else [f"wrong error: {exc}"]
            return [f"the cpu backend ran {rows} rows (its limit is {limit})"]
        xs = strided_copy(x, rng).requires_grad_()
        ws = strided_copy(w, rng).requires_grad_()
        bs = strided_copy(b, rng).requires_grad_() if b is not None else None
        cfg["x_strides"], cfg["w_strides"] = xs.stride(), ws.stride()
        with fastattn.record_dispatch() as calls:
            y = fastattn.linear(xs, ws, bs)
        with torch.no_grad():
            y_direct = fastattn.linear(xs, ws, bs)
        dy = torch.randn(y.shape, generator=gen).to(x.dtype).to(device)
        leaves = [t for t in (xs, ws, bs) if t is not None]
        grads = (torch.autograd.grad(y, leaves, dy) if y.numel()
                 else [torch.zeros_like(t) for t in leaves])
        # oracle (float64, the sums above) and PyTorch in the input dtype (autograd)
        x2 = x.double().reshape(rows, k)
        dy2 = dy.double().reshape(rows, n)
        oracle = linear_math(x2, w.double(), None if b is None else b.double(), dy2)
        pins = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
        pt = F.linear(*pins) if b is not None else F.linear(*pins, None)
        pgrads = (torch.autograd.grad(pt, pins, dy) if pt.numel()
                  else [torch.zeros_like(t) for t in pins])
        failures = []
        want = "cpu" if backend == "cpu" or (backend == "auto" and rows <= limit) else "torch"
        if calls != [("linear", want)]:
            failures.append(f"dispatch {calls}, expected [('linear', '{want}')]")
        if y.dtype != x.dtype or tuple(y.shape) != (*x.shape[:-1], n):
            failures.append(f"y: {y.dtype} {tuple(y.shape)}, expected {x.dtype} "
                            f"{(*x.shape[:-1], n)}")
            return failures
        if not torch.equal(y_direct, y.detach()):
            failures.append(f"no-grad call differs from the grad call by "
                            f"{max_err(y_direct, y):.3g}")
        outs = {"y": (y.reshape(rows, n), pt.reshape(rows, n), k),
                "dinput": (grads[0].reshape(rows, k), pgrads[0].reshape(rows, k), n),
                "dweight": (grads[1], pgrads[1], rows)}
        if b is not None:
            outs["dbias"] = (grads[2], pgrads[2], rows)
        for name, (out, p, kk) in outs.items():
            ref, terms = oracle[name]
            check_sum(name, out, ref, terms, kk, p, failures)
        return failures
    return run


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_linear(backend):
    run_fuzz("linear", backend, DEFAULT_CONFIGS[backend], one_config(backend))
