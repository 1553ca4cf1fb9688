"""apply_rotary / apply_rotary_qk with per-token positions (B, S) (Hugging Face position_ids:
left-padded batches, packed sequences) on every backend against an independent oracle:
a seeded random-configuration fuzz over odd sizes, strided views, partial rotary, both pair
layouts, outputs and gradients; low precision under the 2x rule."""

import pytest
import torch

import fastattn
from fastattn.kernels._compat import interpreting
from tolerances import TIGHT_FP32_TOL, assert_within_2x

BACKENDS = ["cpu", "torch"] + (["triton"] if interpreting() else [])


def oracle(x, cos, sin, positions, interleaved):
    """x (B, S, H, D) in fp64: pairs rotated by the angle of row positions[b, s]."""
    x = x.double()
    c = cos.double()[positions.long()][:, :, None, :]        # (B, S, 1, R/2)
    s = sin.double()[positions.long()][:, :, None, :]
    half = cos.shape[1]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat((a * c - b * s, a * s + b * c), -1)
    return torch.cat((out, rest), -1)


def _case(rng):
    b, s, h = rng.choice([1, 2, 3]), rng.choice([1, 7, 33]), rng.choice([1, 3, 4])
    d = rng.choice([16, 40, 64, 80])
    r = rng.choice([d, d // 2 if (d // 2) % 2 == 0 else d])
    cache = s + rng.choice([0, 5, 100])
    return b, s, h, d, r, cache


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_positions_fuzz_fp32(backend, seed):
    import random
    rng = random.Random(seed)
    b, s, h, d, r, cache = _case(rng)
    interleaved = rng.random() < 0.5
    g = torch.Generator().manual_seed(seed)
    cos, sin = fastattn.rotary_cache(cache, r)
    positions = torch.randint(0, cache, (b, s), generator=g)
    # a strided q: heads interleaved with another tensor's (as a fused qkv projection gives)
    base = torch.randn(b, s, 2 * h, d, generator=g)
    x = base[:, :, ::2].requires_grad_()
    k = torch.randn(b, s, max(1, h // 2), d, generator=g, requires_grad=True)
    with fastattn.use_backend(backend), fastattn.record_dispatch() as calls:
        y = fastattn.apply_rotary(x, cos, sin, seq_dim=1, positions=positions,
                                  interleaved=interleaved)
        qo, ko = fastattn.apply_rotary_qk(x, k, cos, sin, seq_dim=1, positions=positions,
                                          interleaved=interleaved)
        dy = torch.randn(y.shape, generator=g)
        (gx,) = torch.autograd.grad(y, x, dy)
        gq, gk = torch.autograd.grad((qo, ko), (x, k), (dy, torch.ones_like(ko)))
    assert {bk for _, bk in calls} == {backend}, calls
    xr = x.detach().double().requires_grad_()
    kr = k.detach().double().requires_grad_()
    want = oracle(xr, cos, sin, positions, interleaved)
    want_k = oracle(kr, cos, sin, positions, interleaved)
    (wx,) = torch.autograd.grad(want, xr, dy.double())
    (wk,) = torch.autograd.grad(want_k, kr, torch.ones_like(want_k))
    for got, ref in ((y, want), (qo, want), (ko, want_k), (gx, wx), (gq, wx), (gk, wk)):
        torch.testing.assert_close(got.double(), ref, **TIGHT_FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_positions_low_precision(backend, dtype):
    g = torch.Generator().manual_seed(7)
    b, s, h, d = 2, 9, 3, 64
    cos, sin = fastattn.rotary_cache(64, d)
    positions = torch.randint(0, 64, (b, s), generator=g)
    x = torch.randn(b, h, s, d, generator=g).to(dtype)             # (B, H, S, D): seq_dim=2
    with fastattn.use_backend(backend):
        y = fastattn.apply_rotary(x, cos, sin, seq_dim=2, positions=positions)
    xt = x.transpose(1, 2)
    ref = oracle(xt, cos, sin, positions, False).transpose(1, 2)
    pt = oracle(xt.to(dtype).float(), cos, sin, positions, False).to(dtype).transpose(1, 2)
    assert_within_2x(y, ref, pt, name="y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_inplace_and_equivalence_with_offsets(backend):
    g = torch.Generator().manual_seed(1)
    cos, sin = fastattn.rotary_cache(40, 16)
    x = torch.randn(3, 5, 2, 16, generator=g)
    offsets = torch.tensor([0, 7, 30])
    positions = offsets[:, None] + torch.arange(5)
    with fastattn.use_backend(backend):
        a = fastattn.apply_rotary(x, cos, sin, seq_dim=1, offsets=offsets)
        b = fastattn.apply_rotary(x, cos, sin, seq_dim=1, positions=positions)
        c = x.clone()
        fastattn.apply_rotary(c, cos, sin, seq_dim=1, positions=positions, inplace=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(c, b, atol=0, rtol=0)


def test_positions_bad_input():
    cos, sin = fastattn.rotary_cache(10, 8)
    x = torch.randn(2, 4, 1, 8)
    with pytest.raises(ValueError, match="positions"):
        fastattn.apply_rotary(x, cos, sin, seq_dim=1, positions=torch.zeros(2, 3, dtype=int))
    with pytest.raises(ValueError, match="positions"):
        fastattn.apply_rotary(x, cos, sin, seq_dim=1, positions=torch.full((2, 4), 10))
    with pytest.raises(ValueError, match="positions"):
        fastattn.apply_rotary(x, cos, sin, seq_dim=1, positions=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="not both"):
        fastattn.apply_rotary(x, cos, sin, seq_dim=1, positions=torch.zeros(2, 4, dtype=int),
                              offsets=torch.zeros(2, dtype=int))
    # the C++ op checks its own inputs too
    with pytest.raises(RuntimeError, match="positions"):
        torch.ops.fastattn_kernels.rotary_forward(x, cos, sin, False, None, False,
                                          torch.full((2, 4), -1))
