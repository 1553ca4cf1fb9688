"""Triton rotary kernel against fastattn.reference.apply_rotary (TRITON_INTERPRET=1 on CPU).

The gradient of a rotation is the conjugate rotation, so the backward launcher is
rotary_forward(dy, conjugate=True); it is checked against autograd through the reference.
fp16/bf16: max|out - ref| <= 2 * max|pt - ref| + floor; fp32: tight.
"""

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.kernels._compat import interpreting

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastattn.kernels import rotary as trot  # noqa: E402
from tolerances import (ROTARY_ROUNDTRIP, ROTARY_TRITON_FP32, ROWWISE_TRITON_FLOOR, ULP_FP32_TOL,
                        assert_max_err, bound_2x, max_relative_bound)


DEVICE = "cpu" if interpreting() else "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (B, S, H, D, R): full and partial rotary dims, head dims that are not powers of two
SHAPES = [(1, 1, 1, 2, 2), (2, 7, 3, 40, 40), (2, 5, 4, 80, 32), (1, 3, 2, 256, 256),
          (2, 29, 1, 16, 8), (1, 4, 33, 96, 64)]


def assert_close(out, ref, pt, name):
    assert out.dtype == pt.dtype, f"{name}: dtype {out.dtype}, expected {pt.dtype}"
    if pt.dtype == torch.float32:
        bound = max_relative_bound(ref, **ROTARY_TRITON_FP32)
    else:
        bound = bound_2x(pt, ref, ROWWISE_TRITON_FLOOR[pt.dtype])
    assert_max_err(out, ref, bound, name)


def ref_rotary(x, cos, sin, interleaved, offsets, conjugate):
    """(ref in fp32, pt in x's dtype) of the reference on (B, S, H, D)."""
    kw = dict(interleaved=interleaved, seq_dim=1, offsets=offsets, conjugate=conjugate)
    ref = reference.apply_rotary(x.float(), cos.float(), sin.float(), **kw)
    pt = reference.apply_rotary(x, cos, sin, **kw)
    return ref, pt


def make(b, s, h, d, r, dtype, *, cache=None, seed=0, offsets=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, s, h, d, generator=g) * 2).to(dtype).to(DEVICE)
    extra = 5 if offsets else 0
    cos, sin = reference.rotary_cache((cache or s) + extra, r, device=DEVICE)
    offs = torch.randint(0, extra + 1, (b,), generator=g).to(DEVICE) if offsets else None
    return x, cos, sin, offs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward(shape, interleaved, dtype):
    x, cos, sin, offs = make(*shape, dtype, offsets=True, cache=shape[1] + 3)
    y = trot.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=offs, conjugate=False)
    ref, pt = ref_rotary(x, cos, sin, interleaved, offs, False)
    assert_close(y, ref, pt, "y")

    # gradient: autograd through the reference vs the backward launcher (conjugate rotation)
    dy = torch.randn(x.shape).to(dtype).to(DEVICE)
    grads = []
    for xx in (x.float(), x):
        xx = xx.clone().requires_grad_()
        yy = reference.apply_rotary(xx, cos, sin, interleaved=interleaved, seq_dim=1,
                                    offsets=offs)
        (g,) = torch.autograd.grad(yy, xx, dy.to(yy.dtype))
        grads.append(g)
    dx = trot.rotary_forward(dy, cos, sin, interleaved=interleaved, offsets=offs,
                             conjugate=True)
    assert_close(dx, grads[0], grads[1], "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_in_place_conjugate_and_round_trip(interleaved, dtype):
    x, cos, sin, offs = make(2, 9, 3, 48, 32, dtype, offsets=True, seed=1)
    x0 = x.clone()
    out = trot.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=offs,
                              conjugate=True, out=x)
    assert out is x
    ref, pt = ref_rotary(x0, cos, sin, interleaved, offs, True)
    assert_close(x, ref, pt, "in place conjugate")
    assert torch.equal(x[..., 32:], x0[..., 32:]), "pass-through features must be untouched"
    # rotate back: the identity up to rounding
    trot.rotary_forward(x, cos, sin, interleaved=interleaved, offsets=offs, out=x)
    assert_max_err(x, x0, ROTARY_ROUNDTRIP[dtype], "round trip")


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_any_strides_without_copy(interleaved):
    g = torch.Generator().manual_seed(2)
    # (B, H, S, D) storage viewed as (B, S, H, D), and a feature stride of 2
    base = torch.randn(2, 3, 6, 2 * 24, generator=g).to(DEVICE)
    x = base.transpose(1, 2)[..., ::2]
    assert not x.is_contiguous() and x.stride(-1) == 2
    cos, sin = reference.rotary_cache(6, 16, device=DEVICE)
    out = torch.empty(2, 3, 24, 6, device=DEVICE).permute(0, 3, 1, 2)    # strided output
    trot.rotary_forward(x, cos, sin, interleaved=interleaved, out=out)
    ref, _ = ref_rotary(x, cos, sin, interleaved, None, False)
    torch.testing.assert_close(out, ref, **ULP_FP32_TOL)
    # in place on the strided view writes through to the storage
    trot.rotary_forward(x, cos, sin, interleaved=interleaved, out=x)
    torch.testing.assert_close(base.transpose(1, 2)[..., ::2], ref, **ULP_FP32_TOL)
    # non-contiguous tables
    big_cos, big_sin = reference.rotary_cache(6, 32, device=DEVICE)
    y = trot.rotary_forward(x, big_cos[:, ::2], big_sin[:, ::2], interleaved=interleaved)
    ref, _ = ref_rotary(x, big_cos[:, ::2], big_sin[:, ::2], interleaved, None, False)
    torch.testing.assert_close(y, ref, **ULP_FP32_TOL)


class _LaunchCounter:
    """Stands in for the jitted kernel: counts `kernel[grid](...)` launches, then runs them."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("conjugate", [False, True])
def test_qk_one_launch(conjugate, interleaved, dtype, monkeypatch):
    counter = _LaunchCounter(trot._rotary_kernel)
    monkeypatch.setattr(trot, "_rotary_kernel", counter)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 8, 64, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(2, 5, 1, 64, generator=g).to(dtype).to(DEVICE)      # MQA: one kv head
    cos, sin = reference.rotary_cache(12, 48, device=DEVICE)
    offs = torch.tensor([0, 7], device=DEVICE)
    qo, ko = trot.rotary_forward_qk(q, k, cos, sin, interleaved=interleaved, offsets=offs,
                                    conjugate=conjugate)
    # one launch: its grid covers every token (B * S) and the head blocks of q (8 heads: one
    # block of 16) followed by those of k (one block)
    assert counter.grids == [(2 * 5, 1 + 1)], counter.grids
    for name, got, inp in (("q", qo, q), ("k", ko, k)):
        ref, pt = ref_rotary(inp, cos, sin, interleaved, offs, conjugate)
        assert_close(got, ref, pt, name)
    # in place for both
    q2, k2 = q.clone(), k.clone()
    trot.rotary_forward_qk(q2, k2, cos, sin, interleaved=interleaved, offsets=offs,
                           conjugate=conjugate, q_out=q2, k_out=k2)
    assert len(counter.grids) == 2, counter.grids
    assert torch.equal(q2, qo) and torch.equal(k2, ko)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float64])
def test_table_dtypes(table_dtype):
    x, cos, sin, _ = make(2, 6, 2, 32, 32, torch.bfloat16, seed=4)
    cos, sin = cos.to(table_dtype), sin.to(table_dtype)
    y = trot.rotary_forward(x, cos, sin)
    ref, pt = ref_rotary(x, cos, sin, False, None, False)
    assert_close(y, ref, pt, "y")


def test_bad_input():
    # arguments are validated once, by fastattn.apply_rotary / apply_rotary_qk; the launchers
    # only assert
    x, cos, sin, _ = make(1, 4, 2, 16, 16, torch.float32)
    with fastattn.use_backend("triton"):
        with pytest.raises(ValueError, match="x"):
            fastattn.apply_rotary(x.int(), cos, sin)
        with pytest.raises(ValueError, match="x"):
            fastattn.apply_rotary(x[0, 0, 0], cos, sin)
        with pytest.raises(ValueError, match="cos"):
            big_cos, big_sin = reference.rotary_cache(4, 32, device=DEVICE)
            fastattn.apply_rotary(x, big_cos, big_sin)
        with pytest.raises(ValueError, match="offsets"):
            fastattn.apply_rotary(x, cos, sin, offsets=torch.zeros(3, dtype=torch.int64,
                                                                   device=DEVICE))
        with pytest.raises(ValueError, match="k"):
            fastattn.apply_rotary_qk(x, x[:, :2], cos, sin, seq_dim=1)   # k: 2 positions, q: 4


def test_unsupported_and_static_variants():
    assert trot.unsupported("rotary", dtype=torch.float16, device=DEVICE) is None
    assert trot.unsupported("rotary_qk", dtype=torch.float32, device=DEVICE) is None
    assert "dtype" in trot.unsupported("rotary", dtype=torch.float64)
    for arch in (80, 90):
        have = {(v.constexprs["BLOCK_H"], v.constexprs["BLOCK_K"], v.num_warps)
                for v in trot.static_variants(arch)}
        for h in (1, 4, 5, 64):
            for r2 in (1, 16, 20, 64, 128):
                bh, bk = trot._pick(trot.H_BLOCKS, h), trot._pick(trot.K_BLOCKS, r2)
                assert (bh, bk, trot._num_warps(bh, bk)) in have
