"""ALiBi (`alibi_slopes`, flash-attn 2's semantics) on every backend and API: the score of query
i and key j of head h gets -slope[b, h] * |i + shift - j| added after softcap (shift = the
causal rule's diagonal: 0 top-left, Sk - Sq bottom-right, per sequence for varlen, cache
length - Sq for kvcache). Parity with the oracles (fastattn.reference for the dense and varlen
paths, tests/kvcache_oracle.py for the cache), forward and backward, the 2x rule for fp16/bf16
and tight fp32 bounds; bad input; the selector's case key; the custom ops' fakes.

The `cpu` cases need the C++ kernels with ALiBi (branch alibicpu); the triton cases run under
TRITON_INTERPRET=1 (small shapes).
"""

import pytest
import torch

import fastattn
import fastattn.flash_attn as fa
from fastattn import _backend, reference
from conftest import TESTABLE_BACKENDS, backend_device
from kvcache_oracle import check as kvcache_check
from kvcache_oracle import make_case
from kvcache_oracle import oracle as kvcache_oracle
from tolerances import (COMPOSED_FP32_TOL, FP32_ATOL, VARLEN_LSE_LOWP_ATOL, assert_within_2x)
from varlen_support import lse_matches, oracle as varlen_oracle, packed_inputs, run as varlen_run

BACKENDS = [b for b in ("triton", "cpu", "torch") if b in TESTABLE_BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOW = (torch.float16, torch.bfloat16)


def _slopes(shape, seed=0, device="cpu"):
    """Slopes in [0.05, 0.65): biases of several units over a few dozen positions."""
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.rand(*shape, generator=g) * 0.6 + 0.05).to(device)


# ------------------------------------------------------------------------------- dense SDPA

# (name, B, H, Hkv, Sq, Sk, D, options, slope shape "head" (H,) or "batch" (B, H))
DENSE = [
    ("topleft-causal-gqa", 2, 4, 2, 7, 13, 16, dict(is_causal=True), "batch"),
    ("bottomright-causal-sq>sk", 1, 2, 2, 13, 6, 24,
     dict(is_causal=True, causal_alignment="bottom_right"), "head"),
    ("bottomright-window-softcap-mqa", 2, 2, 1, 9, 17, 16,
     dict(window=(3, 2), softcap=5.0, causal_alignment="bottom_right"), "batch"),
    ("floatmask-keylengths", 2, 2, 2, 5, 19, 40, dict(mask="float", key_lengths=[0, 11]), "head"),
    ("decode-splitk-gqa", 1, 4, 2, 3, 530, 16,
     dict(is_causal=True, causal_alignment="bottom_right"), "batch"),
]


def _params(cases, triton_low_precision):
    """(backend, dtype, case) for every case; the interpreter is slow, so triton runs every
    case in fp32 and only the named ones in the low-precision dtypes."""
    return [(b, dt, case) for b in BACKENDS for dt in DTYPES for case in cases
            if b != "triton" or dt == torch.float32 or case[0] in triton_low_precision]


def _ids(params):
    return [f"{b}-{str(d)[6:]}-{c[0]}" for b, d, c in params]


DENSE_PARAMS = _params(DENSE, ("topleft-causal-gqa", "bottomright-window-softcap-mqa"))


def _dense_inputs(case, dtype, device):
    _, b, h, hkv, sq, sk, d, opts, shape = case
    g = torch.Generator().manual_seed(sq * 31 + sk)
    q = torch.randn(b, h, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(b, hkv, sk, d, generator=g)
    dout = torch.randn(b, h, sq, d, generator=g)
    mask = None
    if opts.get("mask") == "float":
        mask = torch.randn(b, 1, sq, sk, generator=g)
        mask = mask.masked_fill(torch.rand(b, 1, sq, sk, generator=g) < 0.2, float("-inf"))
    kl = opts.get("key_lengths")
    kl = None if kl is None else torch.tensor(kl)
    slopes = _slopes((h,) if shape == "head" else (b, h), seed=sq)
    to = (lambda t: None if t is None else t.to(device))
    q, k, v, dout, mask = (to(t.to(dtype)) if t is not None else None
                           for t in (q, k, v, dout, mask))
    return q, k, v, dout, mask, to(kl), to(slopes)


def _dense_oracle(q, k, v, dout, mask, kl, slopes, opts, dtype):
    """(out, lse, dq, dk, dv) of reference.attention in `dtype` (autograd)."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.attention(
        *leaves, mask=None if mask is None else mask.cpu().to(dtype),
        causal=opts.get("is_causal", False),
        alignment=opts.get("causal_alignment", "top_left"),
        window_left=opts.get("window", (-1, -1))[0], window_right=opts.get("window", (-1, -1))[1],
        softcap=opts.get("softcap", 0.0), key_lengths=None if kl is None else kl.cpu(),
        alibi_slopes=slopes.cpu(), return_lse=True)
    grads = torch.autograd.grad(out, leaves, dout.cpu().to(dtype))
    return (out.detach(), lse.detach(), *grads)


def _compare(names, got, ref, pt, dtype, lse_lowp_atol):
    for name, a, r, p in zip(names, got, ref, pt):
        a = a.detach().cpu()
        if name == "lse":
            lse_matches(a, r.float(), lse_lowp_atol if dtype in LOW else FP32_ATOL)
        elif dtype in LOW:
            assert_within_2x(a, r.to(dtype), p, name=name)
        else:
            torch.testing.assert_close(a.double(), r.double(), **COMPOSED_FP32_TOL,
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend,dtype,case", DENSE_PARAMS, ids=_ids(DENSE_PARAMS))
def test_dense_parity(backend, dtype, case):
    device = backend_device(backend)
    q, k, v, dout, mask, kl, slopes = _dense_inputs(case, dtype, device)
    opts = case[7]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = {n: opts[n] for n in ("is_causal", "causal_alignment", "window", "softcap") if n in opts}
    with fastattn.use_backend(backend), fastattn.record_dispatch() as calls:
        out, lse = fastattn.scaled_dot_product_attention(
            *leaves, attn_mask=mask, key_lengths=kl, enable_gqa=True, return_lse=True,
            alibi_slopes=slopes, **kw)
        grads = torch.autograd.grad(out, leaves, dout)
    assert calls == [("attention", backend)]
    ref = _dense_oracle(q, k, v, dout, mask, kl, slopes, opts,
                        torch.float32 if dtype in LOW else torch.float64)
    pt = _dense_oracle(q, k, v, dout, mask, kl, slopes, opts, dtype) if dtype in LOW else ref
    _compare(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref, pt, dtype,
             VARLEN_LSE_LOWP_ATOL)


def test_bias_changes_the_result():
    """The oracle's bias is not a no-op at these sizes (so parity above means something), and
    slopes (H,) equal slopes expanded to (B, H)."""
    q, k, v, _, _, _, slopes = _dense_inputs(DENSE[0], torch.float64, "cpu")
    with fastattn.use_backend("torch"):
        plain = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        biased = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                       alibi_slopes=slopes)
        per_head = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                         alibi_slopes=slopes[0])
        per_head_b = fastattn.scaled_dot_product_attention(
            q, k, v, enable_gqa=True, alibi_slopes=slopes[0].expand(2, 4).contiguous())
    assert (plain - biased).abs().max() > 0.1
    torch.testing.assert_close(per_head, per_head_b, atol=0, rtol=0)


def test_reference_bias_is_the_spec():
    """reference.attention's bias written out: -slope * |i + shift - j| after softcap."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :, :3].repeat(1, 1, 2, 1), v[:, :, :3].repeat(1, 1, 2, 1)        # Sk = 6
    slopes = torch.tensor([[0.25, 0.5]])
    for alignment, shift in (("top_left", 0), ("bottom_right", 2)):
        got = reference.attention(q, k, v, scale=0.5, softcap=2.0, alignment=alignment,
                                  alibi_slopes=slopes)
        s = 2.0 * torch.tanh((q @ k.transpose(-1, -2)) * 0.5 / 2.0)
        i, j = torch.arange(4).view(4, 1), torch.arange(6).view(1, 6)
        s = s - slopes.double().view(1, 2, 1, 1) * (i + shift - j).abs()
        torch.testing.assert_close(got, torch.softmax(s, -1) @ v, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------- varlen

# (name, lens_q, lens_k, H, Hkv, D, options, slope shape)
VARLEN = [
    ("causal-gqa-ragged", [0, 1, 7, 20], [0, 1, 7, 20], 4, 2, 16, dict(is_causal=True), "batch"),
    ("cross-window-softcap", [5, 1, 0, 13], [9, 0, 3, 6], 2, 1, 24,
     dict(window=(4, 1), softcap=5.0), "head"),
    ("causal-window-sq<sk", [3, 17, 1], [11, 17, 4], 2, 2, 16,
     dict(is_causal=True, window=(5, 0)), "batch"),
]


VARLEN_PARAMS = _params(VARLEN, ("causal-gqa-ragged",))


@pytest.mark.parametrize("backend,dtype,case", VARLEN_PARAMS, ids=_ids(VARLEN_PARAMS))
def test_varlen_parity(backend, dtype, case):
    _, lens_q, lens_k, h, hkv, d, opts, shape = case
    device = backend_device(backend)
    inp = packed_inputs(lens_q, lens_k, h, hkv, d, dtype, device, seed=len(lens_q))
    slopes = _slopes((h,) if shape == "head" else (len(lens_q), h), seed=h, device=device)
    got = varlen_run(inp, backend=backend, alibi_slopes=slopes, **opts)
    okw = dict(causal=opts.get("is_causal", False), window=opts.get("window", (-1, -1)),
               softcap=opts.get("softcap", 0.0), alibi_slopes=slopes.cpu())
    cpu_inp = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in inp.items()}
    ref = varlen_oracle(cpu_inp, torch.float32 if dtype in LOW else torch.float64, **okw)
    pt = varlen_oracle(cpu_inp, dtype, **okw) if dtype in LOW else ref
    _compare(("out", "lse", "dq", "dk", "dv"), got, ref, pt, dtype, VARLEN_LSE_LOWP_ATOL)


# ---------------------------------------------------------------------------------- kvcache

# make_case keywords: contiguous and paged (shuffled block tables, block sizes that do not
# divide the lengths), append, Sq > 1, GQA/MQA, window, softcap, cache_batch_idx
KVCACHE = [
    ("decode-gqa", dict(B=3, Sq=1, H=4, Hkv=2, lens=(0, 5, 19), alibi="batch")),
    ("append-sq3-paged3", dict(B=2, Sq=3, H=4, Hkv=1, lens=(4, 10), s_new=3, block_size=3,
                               alibi="head")),
    ("paged5-window-softcap", dict(B=2, Sq=2, H=2, Hkv=2, lens=(13, 7), s_new=2, block_size=5,
                                   window=(4, 0), softcap=5.0, alibi="batch")),
    ("noncausal-batchidx", dict(B=2, Sq=4, H=2, Hkv=1, lens=(6, 2), cache_batch=4,
                                causal=False, alibi="batch")),
]


KVCACHE_PARAMS = _params(KVCACHE, ("decode-gqa", "append-sq3-paged3"))


@pytest.mark.parametrize("backend,dtype,case", KVCACHE_PARAMS, ids=_ids(KVCACHE_PARAMS))
def test_kvcache_parity(backend, dtype, case):
    c = make_case(dtype=dtype, D=16, seed=11, **case[1])
    with fastattn.use_backend(backend), fastattn.record_dispatch() as calls:
        kvcache_check(c, backend_device(backend))
    assert calls == [("kvcache_attention", backend)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_long_cache_split_k(backend):
    """A cache long enough for several splits: each split's bias uses absolute positions."""
    c = make_case(B=2, Sq=2, H=4, Hkv=2, D=16, lens=(600, 250), s_new=1, block_size=7,
                  alibi="batch", seed=5)
    with fastattn.use_backend(backend):
        kvcache_check(c, backend_device(backend))


# ------------------------------------------------------------------------------- flash_attn

@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_functions(backend):
    """flash_attn_func / qkvpacked / varlen / with_kvcache with alibi_slopes against the
    oracles (fp32, bottom-right)."""
    device = backend_device(backend)
    g = torch.Generator().manual_seed(4)
    b, s, sk, h, hkv, d = 2, 5, 8, 4, 2, 16
    q = torch.randn(b, s, h, d, generator=g).to(device)
    k = torch.randn(b, sk, hkv, d, generator=g).to(device)
    v = torch.randn(b, sk, hkv, d, generator=g).to(device)
    slopes = _slopes((b, h), seed=4, device=device)
    with fastattn.use_backend(backend):
        out = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
        packed = fa.flash_attn_qkvpacked_func(torch.stack([q, q, q], 2), alibi_slopes=slopes[0])
    ref = reference.attention(*(t.cpu().double().transpose(1, 2) for t in (q, k, v)),
                              causal=True, alignment="bottom_right", alibi_slopes=slopes.cpu())
    torch.testing.assert_close(out.cpu().double(), ref.transpose(1, 2), **COMPOSED_FP32_TOL)
    qd = q.cpu().double().transpose(1, 2)
    ref_p = reference.attention(qd, qd, qd, alibi_slopes=slopes[0].cpu())
    torch.testing.assert_close(packed.cpu().double(), ref_p.transpose(1, 2), **COMPOSED_FP32_TOL)

    inp = packed_inputs([3, 0, 6], [5, 2, 6], h, hkv, d, torch.float32, device, seed=8)
    vs = _slopes((h,), seed=8, device=device)
    with fastattn.use_backend(backend):
        got = fa.flash_attn_varlen_func(inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"],
                                        inp["max_q"], inp["max_k"], causal=True, alibi_slopes=vs)
    cpu_inp = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in inp.items()}
    ref_v = varlen_oracle(cpu_inp, torch.float64, causal=True, alibi_slopes=vs.cpu())[0]
    torch.testing.assert_close(got.cpu().double(), ref_v, **COMPOSED_FP32_TOL)

    c = make_case(B=2, Sq=2, H=h, Hkv=hkv, D=d, lens=(3, 9), s_new=2, block_size=3,
                  alibi="batch", seed=6)
    ref_out, ref_lse, ref_kc, _ = kvcache_oracle(c, torch.float64)
    kc, vc = c.k_cache.clone().to(device), c.v_cache.clone().to(device)
    to = (lambda t: t.to(device))
    with fastattn.use_backend(backend):
        out_kv, lse_kv = fa.flash_attn_with_kvcache(
            to(c.q), kc, vc, to(c.k), to(c.v), cache_seqlens=to(c.cache_seqlens),
            block_table=to(c.block_table), causal=True, alibi_slopes=to(c.alibi),
            return_softmax_lse=True)
    torch.testing.assert_close(out_kv.cpu().double(), ref_out, **COMPOSED_FP32_TOL)
    torch.testing.assert_close(lse_kv.cpu().double(), ref_lse.double(), **COMPOSED_FP32_TOL)
    torch.testing.assert_close(kc.cpu(), ref_kc, atol=0, rtol=0)


# -------------------------------------------------------------------------------- bad input

def _bad_slopes():
    return [
        ("shape", torch.ones(3)),                         # nheads is 2
        ("shape", torch.ones(2, 2, 1)),
        ("batch", torch.ones(3, 2)),                      # batch is 1 (varlen: 2 sequences)
        ("dtype", torch.ones(2, dtype=torch.float16)),
        ("int", torch.ones(2, dtype=torch.int32)),
        ("device", torch.ones(2, device="meta")),
        ("grad", torch.ones(2, requires_grad=True)),
        ("nan", torch.tensor([0.5, float("nan")])),
        ("inf", torch.tensor([float("inf"), 0.5])),
        ("list", [0.5, 0.25]),
    ]


@pytest.mark.parametrize("kind,slopes", _bad_slopes(), ids=[k for k, _ in _bad_slopes()])
def test_bad_alibi_slopes_raise_naming_it(kind, slopes):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastattn.scaled_dot_product_attention(q, q, q, alibi_slopes=slopes)
    with pytest.raises(ValueError, match="alibi_slopes"):
        fa.flash_attn_func(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2),
                           alibi_slopes=slopes)
    inp = packed_inputs([2, 3], [2, 3], 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastattn.varlen_attention(inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], 3, 3,
                                  alibi_slopes=slopes)
    cache = torch.randn(1, 8, 2, 8)
    with torch.no_grad() if kind != "grad" else torch.enable_grad():
        with pytest.raises(ValueError, match="alibi_slopes"):
            fastattn.kvcache_attention(torch.randn(1, 1, 2, 8), cache, cache, cache_seqlens=3,
                                       alibi_slopes=slopes)


def test_slopes_that_require_grad_are_fine_without_grad_mode():
    q = torch.randn(1, 2, 4, 8)
    slopes = torch.full((2,), 0.5, requires_grad=True)
    with torch.no_grad(), fastattn.use_backend("torch"):
        out = fastattn.scaled_dot_product_attention(q, q, q, alibi_slopes=slopes)
        ref = fastattn.scaled_dot_product_attention(q, q, q, alibi_slopes=slopes.detach())
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


# --------------------------------------------------------------- selector key, custom-op fakes

def test_selector_sees_alibi(monkeypatch):
    """`alibi` is a case key: a backend that declines it makes `auto` pick the next one."""
    from fastattn import _C_ops
    real = _C_ops.unsupported

    def no_alibi(op, **case):
        if case.get("alibi"):
            return "no alibi here (test)"
        return real(op, **case)

    monkeypatch.setattr(_C_ops, "unsupported", no_alibi)
    _backend._select_cached.cache_clear()
    try:
        q = torch.randn(1, 2, 4, 8)
        inp = packed_inputs([2, 3], [2, 3], 2, 2, 8, torch.float32)
        with fastattn.record_dispatch() as calls:
            fastattn.scaled_dot_product_attention(q, q, q, alibi_slopes=torch.ones(2))
            fastattn.varlen_attention(inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"],
                                      3, 3, alibi_slopes=torch.ones(2))
            fastattn.kvcache_attention(q.transpose(1, 2), q.transpose(1, 2),
                                       q.transpose(1, 2), cache_seqlens=4,
                                       alibi_slopes=torch.ones(2))
        assert [b for _, b in calls] == ["torch"] * 3, calls
        with pytest.raises(RuntimeError, match="no alibi here"):
            with fastattn.use_backend("cpu"):
                fastattn.scaled_dot_product_attention(q, q, q, alibi_slopes=torch.ones(2))
    finally:
        _backend._select_cached.cache_clear()


def test_opcheck_with_alibi():
    """The custom ops' schemas and fakes with alibi_slopes (torch backend)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 7, 8, generator=g, requires_grad=True)
    slopes = torch.rand(1, 2, generator=g)
    args = (q, k, k.detach().clone().requires_grad_(), None, None, None, 0.25, True, True, -1,
            -1, 0.0, 0.0, False, "torch", slopes)
    torch.library.opcheck(torch.ops.fastattn.attention.default, args)
    inp = packed_inputs([2, 3], [4, 3], 2, 1, 8, torch.float32)
    args = (inp["q"].requires_grad_(), inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], 3, 4, None,
            0.3, True, -1, -1, 0.0, 0.0, False, False, "torch", torch.rand(2, 2, generator=g))
    torch.library.opcheck(torch.ops.fastattn.varlen_attention.default, args)
    kc = torch.randn(2, 6, 1, 8, generator=g)
    args = (torch.randn(2, 1, 2, 8, generator=g), kc, kc.clone(), None, None,
            torch.tensor([3, 5], dtype=torch.int32), None, None, None, None, False, 0.3, True,
            -1, -1, 0.0, "torch", torch.rand(2, 2, generator=g))
    torch.library.opcheck(torch.ops.fastattn.kvcache_attention.default, args)


def test_compile_fullgraph_varlen_with_alibi():
    torch._dynamo.reset()
    inp = packed_inputs([5, 0, 4], [6, 3, 4], 2, 1, 8, torch.float32, seed=2)
    slopes = _slopes((2,), seed=2)

    def fn(q, k, v, cu_q, cu_k, s):
        return fastattn.varlen_attention(q, k, v, cu_q, cu_k, 5, 6, is_causal=True,
                                         alibi_slopes=s) * 2

    with fastattn.use_backend("torch"):
        eager = fn(inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], slopes)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(
            inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], slopes)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
