"""fastattn.merge_attention_states on every backend against the fp64 oracle.

Merging the attention of two disjoint key blocks must equal attention over both (fp32 tight,
fp16/bf16 by the 2x rule); rows with -inf on one or both sides must give the other side, or
0 / -inf, never NaN; strided inputs; a seeded fuzz of shapes and extreme statistics; gradients.
"""

import pytest
import torch
from conftest import backend_device
from tolerances import (ELEMENTWISE_FP32_TOL, FP32_TOL, MERGE_LSE_FP32_TOL, MERGE_OUT_REL,
                        TIGHT_FP32_TOL, ULP_FP32_TOL, assert_within_2x)

import fastattn
from fastattn import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def oracle(out_a, lse_a, out_b, lse_b):
    """fp64 merge written independently of the kernels: logaddexp and explicit weights."""
    la, lb = lse_a.double(), lse_b.double()
    lse = torch.logaddexp(la, lb)
    empty = torch.isneginf(lse)
    safe = torch.where(empty, torch.zeros_like(lse), lse)
    wa = torch.where(empty, 0.0, torch.exp(la - safe)).unsqueeze(-1)
    wb = torch.where(empty, 0.0, torch.exp(lb - safe)).unsqueeze(-1)
    return wa * out_a.double() + wb * out_b.double(), lse


def blocks(dtype, device, b=2, h=3, sq=17, sk=29, d=40, split=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (sq, sk, sk))
    full, full_lse = reference.attention(q, k, v, return_lse=True)
    oa, la = reference.attention(q, k[:, :, :split], v[:, :, :split], return_lse=True)
    ob, lb = reference.attention(q, k[:, :, split:], v[:, :, split:], return_lse=True)
    dev = dict(device=device)
    return (oa.to(dtype=dtype, **dev), la.to(**dev), ob.to(dtype=dtype, **dev), lb.to(**dev),
            full, full_lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_of_two_key_blocks_is_full_attention(backend, dtype):
    dev = backend_device(backend)
    oa, la, ob, lb, full, full_lse = blocks(dtype, dev)
    with fastattn.record_dispatch() as calls:
        out, lse = fastattn.merge_attention_states(oa, la, ob, lb)
    assert calls == [("merge_attention_states", backend)]
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(lse.cpu(), full_lse, **TIGHT_FP32_TOL)
    # pt: the same merge done in the input dtype by plain torch ops.
    pt, _ = reference.merge_attention_states(oa.cpu(), la.cpu(), ob.cpu(), lb.cpu())
    if dtype != torch.float32:
        w = torch.exp(la.cpu() - full_lse).unsqueeze(-1).to(dtype)
        pt = w * oa.cpu() + (1 - w) * ob.cpu()      # all in `dtype`
    assert_within_2x(out.cpu(), full, pt)


def test_neg_inf_rows(backend):
    dev = backend_device(backend)
    oa, la, ob, lb, _, _ = blocks(torch.float32, dev, sq=6)
    la, lb, oa, ob = la.clone(), lb.clone(), oa.clone(), ob.clone()
    la[:, :, 1] = float("-inf")           # side a has no keys: take b
    oa[:, :, 1] = 0
    lb[:, :, 2] = float("-inf")           # side b has no keys: take a
    ob[:, :, 2] = 0
    la[:, :, 3] = lb[:, :, 3] = float("-inf")   # neither: 0 / -inf
    oa[:, :, 3] = ob[:, :, 3] = 0
    out, lse = fastattn.merge_attention_states(oa, la, ob, lb)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[:, :, 1], ob[:, :, 1], atol=0, rtol=0)
    torch.testing.assert_close(lse[:, :, 1], lb[:, :, 1], atol=0, rtol=0)
    torch.testing.assert_close(out[:, :, 2], oa[:, :, 2], atol=0, rtol=0)
    assert torch.all(out[:, :, 3] == 0) and torch.isneginf(lse[:, :, 3]).all()
    ref_out, ref_lse = oracle(oa, la, ob, lb)
    torch.testing.assert_close(out.double(), ref_out, **ELEMENTWISE_FP32_TOL)
    torch.testing.assert_close(lse.double(), ref_lse, **ULP_FP32_TOL)


def test_strided_inputs(backend):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(3)
    base_a = torch.randn(2, 9, 4, 24, generator=g).to(dev)     # (B, S, H, D)
    base_b = torch.randn(2, 4, 48, 9, generator=g).to(dev)     # D strided by 2 after slicing
    oa = base_a.transpose(1, 2)                                  # (B, H, S, D) strided
    ob = base_b[:, :, ::2].transpose(2, 3)                       # (B, H, S, D), D stride != 1
    la = torch.randn(2, 9, 4, generator=g).to(dev).transpose(1, 2)
    lb = torch.randn(2, 4, 9, generator=g).to(dev)
    out, lse = fastattn.merge_attention_states(oa, la, ob, lb)
    ref_out, ref_lse = oracle(oa, la, ob, lb)
    torch.testing.assert_close(out.double(), ref_out, **ELEMENTWISE_FP32_TOL)
    torch.testing.assert_close(lse.double(), ref_lse, **ULP_FP32_TOL)


def test_fuzz_against_oracle(backend):
    """Seeded random shapes (rows 1..1025, head dims 1..257), huge lse gaps, -inf rows."""
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(1234)
    configs = 6 if backend == "triton" else 20
    for _ in range(configs):
        b, h = (int(x) for x in torch.randint(1, 4, (2,), generator=g))
        s = int(torch.tensor([1, 7, 97, 129, 1025])[torch.randint(0, 5, (1,), generator=g)])
        d = int(torch.tensor([1, 16, 40, 80, 257])[torch.randint(0, 5, (1,), generator=g)])
        dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=g))]
        oa = torch.randn(b, h, s, d, generator=g)
        ob = torch.randn(b, h, s, d, generator=g)
        spread = float(torch.tensor([1.0, 30.0, 1e4])[torch.randint(0, 3, (1,), generator=g)])
        la = torch.randn(b, h, s, generator=g) * spread
        lb = torch.randn(b, h, s, generator=g) * spread
        for lse, o in ((la, oa), (lb, ob)):
            empty = torch.rand(b, h, s, generator=g) < 0.2
            lse[empty] = float("-inf")
            o[empty] = 0
        oa, ob = oa.to(dtype), ob.to(dtype)
        out, lse = fastattn.merge_attention_states(oa.to(dev), la.to(dev), ob.to(dev),
                                                   lb.to(dev))
        ref_out, ref_lse = oracle(oa, la, ob, lb)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        torch.testing.assert_close(lse.cpu().double(), ref_lse, **MERGE_LSE_FP32_TOL)
        # fp32 math, one rounding to the output dtype at the end
        tol = MERGE_OUT_REL[dtype]
        err = (out.cpu().double() - ref_out).abs()
        bound = tol * (1 + ref_out.abs())
        assert torch.all(err <= bound), f"{(b, h, s, d, dtype, spread)}: {err.max().item()}"


def test_gradients_match_reference_autograd(backend):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(5)
    oa, ob = (torch.randn(2, 2, 7, 16, generator=g).to(dev) for _ in range(2))
    la, lb = (torch.randn(2, 2, 7, generator=g).to(dev) for _ in range(2))
    la[0, 0, 1] = lb[0, 0, 1] = float("-inf")   # an empty row: zero gradients, no NaN
    oa[0, 0, 1] = ob[0, 0, 1] = 0
    lb[1, 1, 2] = float("-inf")
    ob[1, 1, 2] = 0
    dout, dlse = torch.randn(2, 2, 7, 16, generator=g).to(dev), torch.randn(2, 2, 7).to(dev)
    dlse[0, 0, 1] = 0
    ours = [t.clone().requires_grad_() for t in (oa, la, ob, lb)]
    out, lse = fastattn.merge_attention_states(*ours)
    (out * dout).sum().backward(inputs=ours, retain_graph=True)
    (torch.where(torch.isinf(lse), 0, lse) * dlse).sum().backward(inputs=ours)
    theirs = [t.clone().double().requires_grad_() for t in (oa, la, ob, lb)]
    r_out, r_lse = reference.merge_attention_states(*theirs)
    (r_out * dout.double()).sum().backward(inputs=theirs, retain_graph=True)
    (torch.where(torch.isinf(r_lse), 0, r_lse) * dlse.double()).sum().backward(inputs=theirs)
    for name, a, b in zip(("out_a", "lse_a", "out_b", "lse_b"), ours, theirs):
        g_ref = torch.nan_to_num(b.grad, nan=0.0)   # the oracle's empty row: exp(-inf - -inf)
        assert torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad.double(), g_ref, **FP32_TOL,
                                   msg=lambda m: f"{name}: {m}")
    assert torch.all(ours[0].grad[0, 0, 1] == 0) and ours[1].grad[0, 0, 1] == 0


def test_gradcheck_fp64_torch_backend():
    g = torch.Generator().manual_seed(7)
    args = [torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64),
            torch.randn(1, 2, 3, generator=g, dtype=torch.float64),
            torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64),
            torch.randn(1, 2, 3, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    with fastattn.use_backend("torch"):
        assert torch.autograd.gradcheck(fastattn.merge_attention_states, args)


def test_bad_input_names_the_argument():
    o = torch.randn(1, 2, 3, 4)
    lse = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="out_b shape"):
        fastattn.merge_attention_states(o, lse, torch.randn(1, 2, 3, 5), lse)
    with pytest.raises(ValueError, match="lse_a"):
        fastattn.merge_attention_states(o, lse.half(), o, lse)
    with pytest.raises(ValueError, match="lse_b must have shape"):
        fastattn.merge_attention_states(o, lse, o, torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="out_b has dtype"):
        fastattn.merge_attention_states(o, lse, o.half(), lse)


def test_cpu_kernel_checks_arguments():
    from fastattn import _C_ops as ops
    if ops.unsupported("merge_attention_states", device="cpu", dtype=torch.float32):
        pytest.fail("the cpu merge kernel is not built: " + str(
            ops.unsupported("merge_attention_states", device="cpu", dtype=torch.float32)))
    o = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="lse_a must be float32"):
        torch.ops.fastattn_kernels.merge_attention_states_forward(o, torch.zeros(1, 2, 3).double(), o,
                                                          torch.zeros(1, 2, 3))
    with pytest.raises(RuntimeError, match="lse_b must have shape"):
        torch.ops.fastattn_kernels.merge_attention_states_forward(o, torch.zeros(1, 2, 3), o,
                                                          torch.zeros(1, 2))


def test_opcheck():
    o = torch.randn(1, 2, 3, 4)
    lse = torch.randn(1, 2, 3)
    from fastattn.ops import merge_attention_states as ops
    for backend in ("cpu", "torch"):
        torch.library.opcheck(ops.merge_op, (o, lse, o.clone(), lse.clone(), backend),
                              test_utils=("test_schema", "test_faketensor"))
