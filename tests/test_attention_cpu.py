"""Parity of the C++ CPU attention kernels (torch.ops.fastattn.attention_forward/backward of
fastattn._C, called directly) with fastattn.reference.attention.

fp32: tight bounds against an fp64 reference. fp16/bf16: the 2x rule of DESIGN.md, for the
output and every gradient. lse is compared exactly where -inf and tightly elsewhere.
"""

import math

import pytest
import torch

from conftest import ATOL_FLOOR, FP32_ATOL, FP32_RTOL, max_err

try:
    import fastattn._C  # noqa: F401  registers torch.ops.fastattn.*
    _BUILT = hasattr(torch.ops.fastattn, "attention_forward")
except ImportError:  # the extension is built in CI; only a pure-Python checkout lacks it
    _BUILT = False
from fastattn import reference

pytestmark = pytest.mark.skipif(not _BUILT, reason="fastattn._C is not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ours(q, k, v, dout, *, mask=None, scale=None, causal=False, alignment="top_left",
         window_left=-1, window_right=-1, softcap=0.0, key_lengths=None, mask_grad=False):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    args = (mask, scale, causal, alignment == "bottom_right", window_left, window_right,
            softcap, key_lengths)
    out, lse = torch.ops.fastattn.attention_forward(q, k, v, *args)
    dq, dk, dv, dmask = torch.ops.fastattn.attention_backward(dout, q, k, v, out, lse, *args,
                                                              mask_grad)
    return out, lse, dq, dk, dv, dmask


def oracle(q, k, v, dout, dtype, *, mask=None, mask_grad=False, **kw):
    """Reference output, lse and gradients computed in `dtype` (fp64 / fp32 / low precision)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = mask
    if mask is not None and mask.is_floating_point():
        m = mask.detach().to(dtype).requires_grad_(mask_grad)
    out, lse = reference.attention(*leaves, mask=m, return_lse=True, **kw)
    out.backward(dout.to(dtype))
    grads = [t.grad for t in leaves] + [m.grad if mask_grad else None]
    return out, lse, grads


def check(q, k, v, *, dout=None, **kw):
    """Runs ours and the oracles, asserts every output; returns ours."""
    gen = torch.Generator().manual_seed(1234)
    if dout is None:
        dout = torch.randn(q.shape, generator=gen).to(q.dtype)
    res = ours(q, k, v, dout, **kw)
    out, lse, dq, dk, dv, dmask = res
    names = ["out", "dq", "dk", "dv", "dmask"]
    mine = [out, dq, dk, dv, dmask]
    if q.dtype == torch.float32:
        ref_out, ref_lse, ref_g = oracle(q, k, v, dout, torch.float64, **kw)
        refs = [ref_out] + ref_g
        for name, a, r in zip(names, mine, refs):
            if r is None:
                continue
            if name == "dmask":  # the ops layer reduces over broadcast dims; do the same
                a = a.sum_to_size(r.shape)
            assert torch.isfinite(a).all(), f"{name}: non-finite values"
            torch.testing.assert_close(a.double(), r, atol=FP32_ATOL, rtol=FP32_RTOL,
                                       msg=lambda m, n=name: f"{n}: {m}")
    else:
        ref_out, ref_lse, ref_g = oracle(q, k, v, dout, torch.float32, **kw)
        pt_out, _, pt_g = oracle(q, k, v, dout, q.dtype, **kw)
        for name, a, r, p in zip(names, mine, [ref_out] + ref_g, [pt_out] + pt_g):
            if r is None:
                continue
            if name == "dmask":
                a = a.sum_to_size(r.shape)
            assert a.dtype == (torch.float32 if name == "dmask" else q.dtype), name
            assert torch.isfinite(a).all(), f"{name}: non-finite values"
            bound = 2 * max_err(p, r) + ATOL_FLOOR[q.dtype]
            err = max_err(a, r)
            assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"
    # lse: fp32 from the (exactly upcast) inputs; -inf exactly where the oracle has it.
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    ref_lse = ref_lse.double()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf rows differ"
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], atol=1e-5, rtol=1e-5)
    return res


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(dtype)


def qkv(B, H, Hkv, Sq, Sk, D, dtype=torch.float32, seed=0):
    return (rand(B, H, Sq, D, dtype=dtype, seed=seed),
            rand(B, Hkv, Sk, D, dtype=dtype, seed=seed + 1),
            rand(B, Hkv, Sk, D, dtype=dtype, seed=seed + 2))


# ------------------------------------------------------------------------------ shapes / dtypes

SHAPES = [(1, 1, 16), (7, 7, 40), (97, 129, 64), (129, 97, 80), (1, 97, 96), (97, 1, 128),
          (33, 65, 256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk,d", SHAPES)
def test_shapes(dtype, causal, sq, sk, d):
    q, k, v = qkv(1, 2, 1, sq, sk, d, dtype, seed=sq + sk + d)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows_span_several_key_blocks(dtype):
    # 1025 keys: several key blocks in the forward (online rescaling), several in the backward,
    # and with B * Hkv = 1 the backward splits keys into chunks whose dQ partials are summed.
    q, k, v = qkv(1, 2, 1, 1025, 1025, 64, dtype, seed=7)
    check(q, k, v, causal=True)


def test_growing_scores_online_softmax():
    # Key norms grow along the sequence, so row maxima sit in the 2nd/3rd key block and the
    # accumulator is rescaled. Logits stay ~15: at ~100 fp32 rounding of the logits alone (also
    # in PyTorch's own fp32 math) exceeds the tight fp32 bound.
    q, k, v = qkv(1, 1, 1, 5, 1100, 32, seed=3)
    k = k * torch.linspace(0.1, 3, 1100).view(1, 1, 1100, 1)
    check(q, k, v, scale=0.35)


# ------------------------------------------------------------------------------------ features

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sq,sk", [(37, 90), (90, 37), (64, 64)])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_causal_alignment(dtype, sq, sk, alignment):
    q, k, v = qkv(2, 2, 1, sq, sk, 32, dtype, seed=sq)
    check(q, k, v, causal=True, alignment=alignment)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("wl,wr,causal", [(8, 0, False), (0, 5, False), (30, 30, False),
                                          (600, -1, True), (-1, 3, False)])
def test_sliding_window(alignment, wl, wr, causal):
    q, k, v = qkv(1, 2, 2, 70, 700, 32, seed=wl + wr)
    check(q, k, v, window_left=wl, window_right=wr, causal=causal, alignment=alignment)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcap(dtype):
    q, k, v = qkv(2, 2, 2, 50, 70, 64, dtype, seed=5)
    check(q, k, v, softcap=2.0, scale=1.0, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h,hkv", [(4, 2), (6, 1)])
def test_gqa_mqa(dtype, h, hkv):
    q, k, v = qkv(2, h, hkv, 33, 47, 40, dtype, seed=h)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bool_mask_broadcast(dtype):
    q, k, v = qkv(2, 3, 3, 29, 41, 32, dtype, seed=11)
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 1, 29, 41, generator=gen) > 0.4  # expanded over heads: stride 0
    check(q, k, v, mask=mask)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16])
def test_float_mask_and_its_gradient(mask_dtype):
    q, k, v = qkv(2, 2, 1, 31, 45, 32, seed=13)
    mask = rand(2, 1, 31, 45, seed=4).to(mask_dtype)  # broadcast over heads
    mask[0, 0, 3, :] = float("-inf")                   # a row whose float scores are all -inf
    mask[1, 0, :, 7] = float("-inf")
    out, lse, *_ = check(q, k, v, mask=mask, mask_grad=mask_dtype == torch.float32)
    assert (out[0, :, 3] == 0).all() and torch.isneginf(lse[0, :, 3]).all()


def test_float_mask_non_contiguous_keys():
    q, k, v = qkv(1, 2, 2, 20, 30, 16, seed=17)
    mask = rand(1, 2, 30, 20, seed=5).transpose(-1, -2)  # stride(-1) != 1
    check(q, k, v, mask=mask, mask_grad=True, causal=True, alignment="bottom_right")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_lengths(dtype):
    q, k, v = qkv(4, 2, 2, 19, 150, 32, dtype, seed=19)
    lengths = torch.tensor([150, 0, 77, 1000], dtype=torch.int32)  # 0: rows empty; >Sk clamps
    out, lse, dq, dk, dv, _ = check(q, k, v, key_lengths=lengths, causal=True,
                                    alignment="bottom_right")
    assert (out[1] == 0).all() and (dq[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert (dk[2, :, 77:] == 0).all() and (dv[2, :, 77:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_give_zero(dtype):
    q, k, v = qkv(1, 2, 2, 40, 40, 32, dtype, seed=23)
    mask = torch.ones(1, 2, 40, 40, dtype=torch.bool)
    mask[0, 0, 5] = False
    mask[0, 1, 30:] = False
    # window_left=0 with top-left causal keeps only the diagonal; Sq > Sk bottom-right empties
    # the first rows structurally.
    out, lse, dq, *_ = check(q, k, v, mask=mask)
    assert (out[0, 0, 5] == 0).all() and (dq[0, 0, 5] == 0).all()
    assert torch.isneginf(lse[0, 1, 30:]).all()
    q2, k2, v2 = qkv(1, 1, 1, 50, 20, 16, dtype, seed=29)
    out, lse, dq, *_ = check(q2, k2, v2, causal=True, alignment="bottom_right")
    assert (out[0, 0, :30] == 0).all() and (dq[0, 0, :30] == 0).all()
    assert torch.isneginf(lse[0, 0, :30]).all()


# ---------------------------------------------------------------------------- layouts / strides

def test_non_contiguous_and_offset_inputs():
    gen = torch.Generator().manual_seed(31)
    # (B, S, H, D) storage viewed as (B, H, S, D), as the module's projections produce.
    qs = torch.randn(2, 45, 4, 48, generator=gen).transpose(1, 2)
    # offset views: a slice of a longer sequence and of a wider head dim (stride(-2) > D)
    kbig = torch.randn(2, 2, 70, 64, generator=gen)
    k = kbig[:, :, 10:60, :48]
    v = torch.randn(2, 2, 50, 96, generator=gen)[..., ::2]  # stride(-1) = 2
    dout = torch.randn(2, 45, 4, 48, generator=gen).transpose(1, 2)
    assert not qs.is_contiguous() and k.storage_offset() > 0 and v.stride(-1) == 2
    check(qs, k, v, dout=dout, causal=True)
    check(qs.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16),
          dout=dout.to(torch.bfloat16))


def test_backward_deterministic():
    q, k, v = qkv(1, 4, 1, 300, 700, 32, seed=37)  # B * Hkv = 1: chunked dK/dV + dQ sum
    dout = rand(1, 4, 300, 32, seed=8)
    first = ours(q, k, v, dout, causal=True)
    second = ours(q, k, v, dout, causal=True)
    for a, b in zip(first[:5], second[:5]):
        assert torch.equal(a, b)


def test_empty_sequences():
    q, k, v = qkv(1, 2, 2, 0, 5, 16)
    out, lse, dq, dk, dv, _ = ours(q, k, v, torch.zeros_like(q))
    assert out.shape == (1, 2, 0, 16) and (dk == 0).all() and (dv == 0).all()
    q, k, v = qkv(1, 2, 2, 4, 0, 16)
    out, lse, dq, dk, dv, _ = ours(q, k, v, torch.ones_like(q))
    assert (out == 0).all() and torch.isneginf(lse).all() and (dq == 0).all()


# ---------------------------------------------------------------------------------- bad input

def _fwd(q, k, v, mask=None, softcap=0.0, key_lengths=None, wl=-1):
    return torch.ops.fastattn.attention_forward(q, k, v, mask, 0.1, False, False, wl, -1,
                                                softcap, key_lengths)


@pytest.mark.parametrize("case,match", [
    ("q_rank", "q must be 4-D"),
    ("k_dtype", "k and v must have q's dtype"),
    ("q_int", "q must be float32, bfloat16 or float16"),
    ("heads", "head count"),
    ("v_len", "v must have k's sequence length"),
    ("head_dim", "k and v must have q's head dim"),
    ("batch", "k and v must have q's batch size"),
    ("mask_shape", "mask must be expanded"),
    ("mask_dtype", "mask must be bool or float"),
    ("kl_dtype", "key_lengths must be an integer tensor"),
    ("kl_shape", "key_lengths must have shape"),
    ("softcap", "softcap must be >= 0"),
    ("window", "window_left/window_right"),
])
def test_bad_input_names_the_argument(case, match):
    q, k, v = qkv(2, 4, 2, 8, 9, 16)
    kw = {}
    if case == "q_rank":
        q = q[0]
    elif case == "k_dtype":
        k = k.to(torch.bfloat16)
    elif case == "q_int":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    elif case == "heads":
        k, v = k[:, :1].expand(2, 3, 9, 16), v[:, :1].expand(2, 3, 9, 16)
    elif case == "v_len":
        v = v[:, :, :5]
    elif case == "head_dim":
        k = k[..., :8]
    elif case == "batch":
        k, v = k[:1], v[:1]
    elif case == "mask_shape":
        kw["mask"] = torch.ones(2, 1, 8, 9, dtype=torch.bool)
    elif case == "mask_dtype":
        kw["mask"] = torch.ones(2, 4, 8, 9, dtype=torch.int64)
    elif case == "kl_dtype":
        kw["key_lengths"] = torch.ones(2)
    elif case == "kl_shape":
        kw["key_lengths"] = torch.ones(3, dtype=torch.int64)
    elif case == "softcap":
        kw["softcap"] = -1.0
    elif case == "window":
        kw["wl"] = -2
    with pytest.raises(RuntimeError, match=match):
        _fwd(q, k, v, **kw)


def test_bad_backward_input_names_the_argument():
    q, k, v = qkv(1, 2, 2, 8, 9, 16)
    out, lse = _fwd(q, k, v)
    args = (None, 0.1, False, False, -1, -1, 0.0, None)
    with pytest.raises(RuntimeError, match="dout must be"):
        torch.ops.fastattn.attention_backward(out[:, :, :4], q, k, v, out, lse, *args, False)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.fastattn.attention_backward(out, q, k, v, out, lse[0], *args, False)
    with pytest.raises(RuntimeError, match="mask_needs_grad"):
        torch.ops.fastattn.attention_backward(out, q, k, v, out, lse, *args, True)
