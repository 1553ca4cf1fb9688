"""Seeded random-configuration fuzz of fastattn.swiglu against a float64 oracle written from
the math: the output and the gradients of gate and up, on every backend.

Random: rank 1-4, sizes that break kernels (1, 7, 33, 97, 129, 1000, 1025, 4097, ...), empty
tensors, strided/permuted/padded views and expanded (stride-0) inputs, magnitudes from tiny
(1e-30: silu(g) ~ g / 2) to huge (|gate| ~ 1e4: sigmoid saturates, exp(-g) overflows fp32 for
g < -88), fp16/bf16/fp32. Configs per test: $FASTATTN_FUZZ_CONFIGS (default below); base seed
$FASTATTN_FUZZ_SEED (tests/fuzz_support.py).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fuzz_support import FUZZ_BACKENDS, check, pick_dtype, run_fuzz, strided_copy

import fastattn

SIZES = (1, 2, 7, 16, 33, 97, 129, 1000, 1025, 4097)
OTHER_SIZES = (1, 2, 3, 5, 7, 16)
# Default configs per backend: sized for the suite (the interpreter is slow per element).
DEFAULT_CONFIGS = {"cpu": 150, "torch": 50, "triton": 30, "cuda": 150}
MAX_ELEMENTS = {"cpu": 1 << 17, "torch": 1 << 15, "triton": 1 << 13, "cuda": 1 << 17}


def swiglu_math(gate, up, dy):
    """The oracle, in the inputs' dtype (float64): silu(g) * u = g * sigmoid(g) * u and its
    gradients written out, independent of fastattn.reference and of autograd."""
    sig = 1.0 / (1.0 + torch.exp(-gate))
    out = gate * sig * up
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dy * gate * sig
    return out, dgate, dup


def _magnitude(rng, dtype):
    kind = rng.choice(("normal", "normal", "normal", "huge", "tiny"))
    if kind == "huge":       # fp16: |gate| ~ 2e3 keeps silu(g) * u below 65504
        return kind, 2e3 if dtype == torch.float16 else 1e4
    if kind == "tiny":       # fp16 has no 1e-30: its smallest normals are ~6e-5
        return kind, 1e-4 if dtype == torch.float16 else 1e-30
    return kind, rng.choice((0.5, 1.0, 3.0, 10.0))


def draw(rng, gen, device, backend, cfg):
    dtype = pick_dtype(rng)
    ndim = rng.choice((1, 2, 2, 3, 3, 4))
    shape = [rng.choice(OTHER_SIZES) for _ in range(ndim)]
    shape[rng.randrange(ndim)] = rng.choice(SIZES)
    if rng.random() < 0.03:
        shape[rng.randrange(ndim)] = 0                         # empty tensor
    while math.prod(shape) > MAX_ELEMENTS[backend]:
        d = rng.choice([d for d in range(ndim) if shape[d] > 1])
        shape[d] = max(1, shape[d] // 2)
    kind, gmag = _magnitude(rng, dtype)
    umag = 1.0 if kind == "huge" and dtype == torch.float16 else rng.choice((0.5, 1.0, 3.0))
    gate = (torch.randn(shape, generator=gen) * gmag).to(dtype)
    up_shape = list(shape)
    broadcast = ndim > 1 and rng.random() < 0.15                 # up expanded along a dim
    if broadcast:
        up_shape[rng.randrange(ndim)] = 1
    up = (torch.randn(up_shape, generator=gen) * umag).to(dtype)
    cfg.update(shape=tuple(shape), dtype=str(dtype).replace("torch.", ""), magnitude=kind,
               gate_scale=gmag, up_scale=umag, up_broadcast=broadcast)
    return gate.to(device), up.to(device), up_shape


def one_config(backend):
    def run(rng, gen, device, cfg):
        gate, up_small, up_shape = draw(rng, gen, device, backend, cfg)
        up = up_small.expand(gate.shape)
        gs = strided_copy(gate, rng).requires_grad_()
        if cfg["up_broadcast"]:
            us = up_small.clone().requires_grad_()
            up_in = us.expand(gate.shape)                          # stride 0 along a dim
        else:
            us = strided_copy(up, rng).requires_grad_()
            up_in = us
        cfg["gate_strides"], cfg["up_strides"] = gs.stride(), up_in.stride()
        y = fastattn.swiglu(gs, up_in)
        dy = torch.randn(gate.shape, generator=gen).to(gate.dtype).to(device)
        if y.numel():
            dgate, dup = torch.autograd.grad(y, (gs, up_in), dy)
        else:
            dgate, dup = torch.zeros_like(gate), torch.zeros_like(up)
        # oracle (float64, the math above) and PyTorch in the input dtype (autograd)
        ref, ref_dgate, ref_dup = swiglu_math(gate.double(), up.double(), dy.double())
        gp = gate.detach().clone().requires_grad_()
        upp = up.detach().clone().requires_grad_()
        pt = F.silu(gp) * upp
        pt_dgate, pt_dup = (torch.autograd.grad(pt, (gp, upp), dy) if pt.numel()
                            else (torch.zeros_like(gate), torch.zeros_like(up)))
        failures = []
        if y.dtype != gate.dtype:
            failures.append(f"y: dtype {y.dtype}, expected {gate.dtype}")
        check("y", y, ref, pt, cfg, failures)
        check("dgate", dgate, ref_dgate, pt_dgate, cfg, failures)
        check("dup", dup, ref_dup, pt_dup, cfg, failures)
        return failures
    return run


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
def test_fuzz_swiglu(backend):
    run_fuzz("swiglu", backend, DEFAULT_CONFIGS[backend], one_config(backend))
