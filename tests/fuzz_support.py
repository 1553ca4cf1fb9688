"""Shared pieces of the seeded random-configuration fuzz tests (tests/test_fuzz_*.py).

Convention shared by every fuzz file:
  configs per test  int(os.environ.get("FASTATTN_FUZZ_CONFIGS", <the test's default>))
  base seed         int(os.environ.get("FASTATTN_FUZZ_SEED", "0"))
Config i of a test is drawn from random.Random(f"{test}:{seed}:{i}"), so a failure printed as
"seed=S config #i" reproduces with FASTATTN_FUZZ_SEED=S and at least i + 1 configs.
`make fuzz` runs every fuzz test with 1000 configs per test.

Each test compares a fastattn op with a float64 oracle written from the op's math in its own
test file (independent of fastattn/reference.py), outputs and gradients. Tolerances follow
DESIGN.md: fp16/bf16 max|out - ref| <= 2 * max|pt - ref| + floor, where pt is PyTorch's own
computation in the input dtype; fp32 is held to the same rule with a floor of a few fp32 ulps
of the reference's magnitude (tight: PyTorch's fp32 error is ~1e-7 relative). The constants
live in tests/tolerances.py.
"""

import os
import random

import pytest
import torch

import fastattn
from fastattn import _backend
from conftest import backend_device
from tolerances import FUZZ_FP32_REL_FLOOR, LOW_PRECISION, floor_for, max_err

FUZZ_BACKENDS = ("cpu", "torch", "triton", "cuda")


def num_configs(default):
    return int(os.environ.get("FASTATTN_FUZZ_CONFIGS", default))


def base_seed():
    return int(os.environ.get("FASTATTN_FUZZ_SEED", "0"))


def config_rng(test, i):
    """(random.Random, torch.Generator) of config i of `test`."""
    seed = base_seed()
    rng = random.Random(f"{test}:{seed}:{i}")
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    return rng, gen


def require_backend(backend):
    """Skip GPU-only backends where they cannot run; cpu and torch must run (make test builds
    fastattn._C, so a missing cpu backend is a failure, not a skip)."""
    reason = _backend.unavailable_reason(backend, backend_device(backend))
    if reason is None:
        return
    if backend in ("cpu", "torch"):
        pytest.fail(f"backend {backend} unavailable: {reason}")
    pytest.skip(f"backend {backend} unavailable here: {reason}")


def pick_dtype(rng):
    return rng.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16))


def strided_copy(t, rng, gen=None):
    """A non-contiguous tensor equal to t (same shape and values), in a random one of: dims
    permuted in storage, padding between rows (a sliced view), or contiguous. Leaf-ready."""
    if t.dim() == 0 or t.numel() == 0:
        return t.clone()
    kind = rng.choice(("contiguous", "permuted", "padded", "permuted_padded"))
    if kind == "contiguous":
        return t.clone()
    order = list(range(t.dim()))
    if "permuted" in kind:
        rng.shuffle(order)
    shape = [t.shape[d] for d in order]
    pad = [0] * t.dim()
    if "padded" in kind:
        pad[rng.randrange(t.dim())] = rng.choice((1, 3))
    storage = torch.full([s + p for s, p in zip(shape, pad)], float("nan"), dtype=t.dtype,
                         device=t.device)
    view = storage[tuple(slice(0, s) for s in shape)]          # padding stays NaN: never read
    inverse = [order.index(d) for d in range(t.dim())]
    view = view.permute(inverse)
    view.copy_(t)
    return view


def check(name, out, ref, pt, cfg, failures, cond=1.0, scale=None):
    """Append a message to `failures` when out (kernel) misses the tolerance rule against ref
    (float64 oracle) and pt (PyTorch in the input dtype). `cond` (>= 1) scales the fp32 floor
    for an ill-conditioned case (LayerNorm of rows whose mean is far larger than their spread:
    h - mean cancels, and any fp32 implementation, PyTorch's included, loses |mean| / std
    ulps; PyTorch's own error can be lucky on one config, so 2 x pt alone is not a bound).
    `scale`: the magnitude of the terms that make up the value, when cancellation can make the
    value itself much smaller (default max|ref|)."""
    if out is None or ref is None:
        if (out is None) != (ref is None):
            failures.append(f"{name}: got {out is not None}, expected {ref is not None}")
        return
    if tuple(out.shape) != tuple(ref.shape):
        failures.append(f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
        return
    if out.numel() == 0:
        return
    if not torch.isfinite(out).all():
        failures.append(f"{name}: non-finite values ({(~torch.isfinite(out)).sum().item()})")
        return
    err = max_err(out, ref)
    pt_err = max_err(pt, ref)
    scale = max(ref.abs().max().item(), scale or 0.0)
    if out.dtype in LOW_PRECISION:
        bound = 2 * pt_err + floor_for(out.dtype)
    else:
        bound = 2 * pt_err + FUZZ_FP32_REL_FLOOR * max(1.0, scale) * cond
    if not err <= bound:
        failures.append(f"{name}: max err {err:.3g} > bound {bound:.3g} (pt err {pt_err:.3g}, "
                        f"max|ref| {scale:.3g})")


def run_fuzz(test, backend, n_default, one_config):
    """Run `one_config(rng, gen, device, cfg) -> failures` for each config (it records what it
    drew in the dict `cfg`, so a config that raises is printed too); fail with every failing
    config (up to 10) and the seed that reproduces them."""
    require_backend(backend)
    device = backend_device(backend)
    bad = []
    n = num_configs(n_default)
    with fastattn.use_backend(backend):
        for i in range(n):
            rng, gen = config_rng(test, i)
            cfg = {}
            try:
                failures = one_config(rng, gen, device, cfg)
            except Exception as exc:       # an exception in one config is a failure
                failures = [f"raised {type(exc).__name__}: {exc}"]
            if failures:
                bad.append(f"config #{i} {cfg}: " + "; ".join(failures))
    assert not bad, (f"{test} [{backend}]: {len(bad)} of {n} configs failed "
                     f"(FASTATTN_FUZZ_SEED={base_seed()}):\n" + "\n".join(bad[:10]))
