"""Parity of the C++ CPU attention kernels (torch.ops.fastattn_kernels.attention_forward/backward of
fastattn._C, called directly) with fastattn.reference.attention.

fp32: tight bounds against an fp64 reference. fp16/bf16: the 2x rule of DESIGN.md, for the
output and every gradient. lse is compared exactly where -inf and tightly elsewhere.
"""

import math

import pytest
import torch

from tolerances import FP32_TOL, TIGHT_FP32_TOL, assert_max_err, bound_2x, floor_for

try:
    import fastattn._C  # noqa: F401  registers torch.ops.fastattn_kernels.*
    _BUILT = hasattr(torch.ops.fastattn_kernels, "attention_forward")
except ImportError:  # the extension is built in CI; only a pure-Python checkout lacks it
    _BUILT = False
from fastattn import reference

pytestmark = pytest.mark.skipif(not _BUILT, reason="fastattn._C is not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ours(q, k, v, dout, *, mask=None, scale=None, causal=False, alignment="top_left",
         window_left=-1, window_right=-1, softcap=0.0, key_lengths=None, mask_grad=False,
         dropout_p=0.0, seed=0, offset=0, alibi_slopes=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    args = (mask, scale, causal, alignment == "bottom_right", window_left, window_right,
            softcap, key_lengths)
    drop = (dropout_p, seed, offset, alibi_slopes)
    out, lse = torch.ops.fastattn_kernels.attention_forward(q, k, v, *args, *drop)
    dq, dk, dv, dmask = torch.ops.fastattn_kernels.attention_backward(dout, q, k, v, out, lse, *args,
                                                              mask_grad, *drop)
    return out, lse, dq, dk, dv, dmask


def keep_mask(q, k, dropout_p, seed, offset):
    return torch.ops.fastattn_kernels.attention_dropout_mask(q.shape[0], q.shape[1], q.shape[2],
                                                     k.shape[2], dropout_p, seed, offset)


def oracle(q, k, v, dout, dtype, *, mask=None, mask_grad=False, dropout_p=0.0, seed=0,
           offset=0, **kw):
    """Reference output, lse and gradients computed in `dtype` (fp64 / fp32 / low precision).
    With dropout it uses the C++ op's keep mask (whose definition test_dropout_mask_definition
    checks independently)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = mask
    if mask is not None and mask.is_floating_point():
        m = mask.detach().to(dtype).requires_grad_(mask_grad)
    if dropout_p > 0:
        kw.update(dropout_mask=keep_mask(q, k, dropout_p, seed, offset), dropout_p=dropout_p)
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
            torch.testing.assert_close(a.double(), r, **FP32_TOL,
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
            assert_max_err(a, r, bound_2x(p, r, floor_for(q.dtype)), name)
    # lse: fp32 from the (exactly upcast) inputs; -inf exactly where the oracle has it.
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    ref_lse = ref_lse.double()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf rows differ"
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], **TIGHT_FP32_TOL)
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
    lengths = torch.tensor([150, 0, 77, 149], dtype=torch.int32)  # 0: rows empty
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


def test_seeded_fuzz_one_query_row():
    """One query row (one-token decoding through the dense API) in random configurations:
    both causal alignments (top-left sees key 0 only), windows, softcap, ALiBi, key_lengths,
    odd head dims, GQA, strided (B, S, H, D)-layout views, no keys at all; output, lse and
    gradients against the oracle. Huge logits at Sq = 1 are in tests/test_fuzz_attention.py,
    whose bound grows with the logits as the roundings do."""
    gen = torch.Generator().manual_seed(2026)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    for case in range(48):
        dtype = pick(torch.float32, torch.float32, torch.bfloat16, torch.float16)
        b, hkv, group = pick(1, 2, 3), pick(1, 2, 3), pick(1, 2, 4)
        sk, d = pick(0, 1, 7, 300, 700), pick(8, 40, 64, 96, 128)
        h = hkv * group

        def tensor(heads, s, seed):             # (B, S, heads, D) memory seen as (B, heads, S, D)
            x = rand(b, s, heads, d + 3, dtype=dtype, seed=1000 * case + seed)
            return x[..., :d].transpose(1, 2)
        q, k, v = tensor(h, 1, 0), tensor(hkv, sk, 1), tensor(hkv, sk, 2)
        kw = dict(causal=pick(False, True), alignment=pick("top_left", "bottom_right"),
                  softcap=pick(0.0, 0.0, 5.0))
        if pick(False, True):
            kw.update(window_left=pick(-1, 0, 3, 50), window_right=pick(-1, 0, 2))
        if pick(False, False, True):
            kw["alibi_slopes"] = rand(b, h, seed=case).abs()
        if pick(False, False, False, True):
            kw["key_lengths"] = torch.randint(0, sk + 1, (b,), generator=gen)
        check(q, k, v, **kw)


# ---------------------------------------------------------------------------------- bad input

def _fwd(q, k, v, mask=None, softcap=0.0, key_lengths=None, wl=-1, dropout_p=0.0):
    return torch.ops.fastattn_kernels.attention_forward(q, k, v, mask, 0.1, False, False, wl, -1,
                                                softcap, key_lengths, dropout_p, 0, 0)


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
    ("dropout", "dropout_p must be in"),
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
    elif case == "dropout":
        kw["dropout_p"] = 1.0
    with pytest.raises(RuntimeError, match=match):
        _fwd(q, k, v, **kw)


def test_bad_backward_input_names_the_argument():
    q, k, v = qkv(1, 2, 2, 8, 9, 16)
    out, lse = _fwd(q, k, v)
    args = (None, 0.1, False, False, -1, -1, 0.0, None)
    drop = (0.0, 0, 0)
    with pytest.raises(RuntimeError, match="dout must be"):
        torch.ops.fastattn_kernels.attention_backward(out[:, :, :4], q, k, v, out, lse, *args, False,
                                              *drop)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.fastattn_kernels.attention_backward(out, q, k, v, out, lse[0], *args, False, *drop)
    with pytest.raises(RuntimeError, match="mask_needs_grad"):
        torch.ops.fastattn_kernels.attention_backward(out, q, k, v, out, lse, *args, True, *drop)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        torch.ops.fastattn_kernels.attention_backward(out, q, k, v, out, lse, *args, False, -0.5, 0, 0)


# ------------------------------------------------------------------------------------- dropout

_M32 = 0xFFFFFFFF


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _mul32(x, c):
    # (x * c) mod 2^32 on int64 tensors without overflowing int64: split x into 16-bit halves.
    return ((x & 0xFFFF) * c + (((x >> 16) * c) << 16)) & _M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _keep_by_definition(shape, p, seed, offset):
    """The keep mask as csrc/common/dropout_rng.h defines it, written independently here."""
    key = _splitmix64(_splitmix64(seed % 2**64) ^ (offset % 2**64))
    k0, k1 = key & _M32, key >> 32
    idx = torch.arange(math.prod(shape), dtype=torch.int64)
    lo, hi = idx & _M32, idx >> 32
    bits = _mix32(((_mix32(lo ^ k0) + _mix32(hi ^ k1)) & _M32))
    return ((bits >> 8) >= math.ceil(p * 2**24)).view(shape)


@pytest.mark.parametrize("p,seed,offset", [(0.1, 0, 0), (0.5, 12345, 7), (0.9, 2**31 - 1, 2**40)])
def test_dropout_mask_definition(p, seed, offset):
    # Odd Sk: rows end mid-vector, so the 16-lane path, its tails and the row bases are all hit.
    shape = (2, 3, 19, 37)
    keep = torch.ops.fastattn_kernels.attention_dropout_mask(*shape, p, seed, offset)
    assert keep.dtype == torch.bool and keep.shape == shape
    assert torch.equal(keep, _keep_by_definition(shape, p, seed, offset))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction(p):
    keep = torch.ops.fastattn_kernels.attention_dropout_mask(4, 4, 128, 128, p, 3, 0)
    n = keep.numel()
    frac = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, (frac, 1 - p, sigma)
    # no structure along keys or queries: per-column and per-row keep rates are all plausible
    cols = keep.double().mean(dim=(0, 1, 2))
    assert (cols - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / (n // 128))


def test_dropout_seed_and_offset():
    a = torch.ops.fastattn_kernels.attention_dropout_mask(2, 2, 33, 65, 0.5, 1, 0)
    assert torch.equal(a, torch.ops.fastattn_kernels.attention_dropout_mask(2, 2, 33, 65, 0.5, 1, 0))
    for seed, offset in [(2, 0), (1, 1)]:
        b = torch.ops.fastattn_kernels.attention_dropout_mask(2, 2, 33, 65, 0.5, seed, offset)
        # unrelated masks disagree on about half the entries (not a shifted copy either)
        assert 0.45 < (a != b).double().mean().item() < 0.55
        assert 0.45 < (a[..., 1:] != b[..., :-1]).double().mean().item() < 0.55
    assert torch.ops.fastattn_kernels.attention_dropout_mask(1, 1, 4, 4, 0.0, 5, 5).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk,d", [(7, 7, 40), (97, 129, 64), (129, 97, 80)])
def test_dropout_matches_reference(dtype, causal, sq, sk, d):
    q, k, v = qkv(2, 2, 1, sq, sk, d, dtype, seed=sq + sk)
    check(q, k, v, causal=causal, dropout_p=0.3, seed=11, offset=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_long_rows_several_key_blocks(dtype):
    # online rescaling over several forward key blocks, chunked backward
    q, k, v = qkv(1, 2, 1, 70, 1100, 32, dtype, seed=41)
    check(q, k, v, dropout_p=0.2, seed=3, offset=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_with_causal_gqa_key_lengths_and_masks(dtype):
    q, k, v = qkv(3, 6, 2, 45, 70, 32, dtype, seed=43)
    lengths = torch.tensor([70, 0, 33])
    gen = torch.Generator().manual_seed(9)
    mask = torch.rand(3, 1, 45, 70, generator=gen) > 0.2
    mask[0, 0, 4] = False  # a fully masked row
    out, lse, dq, dk, dv, _ = check(q, k, v, causal=True, alignment="bottom_right",
                                    key_lengths=lengths, mask=mask, dropout_p=0.4, seed=99,
                                    offset=123)
    assert (out[1] == 0).all() and (dq[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert (out[0, :, 4] == 0).all() and (dq[0, :, 4] == 0).all()
    assert (dk[2, :, 33:] == 0).all() and (dv[2, :, 33:] == 0).all()


def test_dropout_softcap_and_float_mask_gradient():
    q, k, v = qkv(2, 2, 2, 31, 45, 32, seed=47)
    mask = rand(2, 1, 31, 45, seed=6)
    check(q, k, v, mask=mask, mask_grad=True, softcap=3.0, dropout_p=0.25, seed=5, offset=2)


def test_dropout_lse_is_undropped_and_runs_are_bitwise_equal():
    q, k, v = qkv(2, 4, 2, 50, 60, 32, seed=53)
    dout = rand(2, 4, 50, 32, seed=54)
    plain = ours(q, k, v, dout)
    first = ours(q, k, v, dout, dropout_p=0.5, seed=8, offset=3)
    second = ours(q, k, v, dout, dropout_p=0.5, seed=8, offset=3)
    for a, b in zip(first[:5], second[:5]):
        assert torch.equal(a, b)
    assert torch.equal(first[1], plain[1])  # lse of the undropped P
    other = ours(q, k, v, dout, dropout_p=0.5, seed=8, offset=4)
    assert not torch.equal(other[0], first[0])


# ------------------------------------------------------------------ GEMM engines

def test_gemm_engine_reported():
    import fastattn
    assert fastattn.build_info()["cpu_gemm"] in ("onednn-brgemm", "mkl-sgemm")


def test_parity_on_the_mkl_fallback():
    """The tiles' GEMMs run on oneDNN brgemm where it works and on MKL sgemm otherwise (chosen
    once per process). Rerun this file's parity tests in a process forced onto MKL, so the
    fallback is proven on machines where brgemm is the default."""
    import os
    import subprocess
    import sys
    from conftest import rerun_tests
    env = dict(os.environ, FASTATTN_CPU_GEMM="mkl")
    check = subprocess.run(
        [sys.executable, "-c", "import fastattn; print(fastattn.build_info()['cpu_gemm'])"],
        env=env, capture_output=True, text=True, timeout=300)
    assert check.stdout.strip() == "mkl-sgemm", check.stdout + check.stderr
    rerun_tests([os.path.basename(__file__)],
                "not mkl_fallback and not gemm_engine and not bad_ and not dropout_mask_definition",
                FASTATTN_CPU_GEMM="mkl")
