"""ALiBi in the C++ CPU attention kernels (dense attention forward/backward, varlen forward/
backward, kvcache forward) through the cpu backend's adaptors (fastattn/_C_ops.py), against a
float64 oracle written here from the spec (independent of fastattn's own code):

    s_ij = softcap(scale * q_i . k_j) - slope[b, h] * |i + off - j|

with off the diagonal offset of the path's causal/window mask (dense: 0 top-left, Sk - Sq
bottom-right; varlen: len_k - len_q per sequence; kvcache: cache_seqlens[b] + Sq_new - Sq),
slopes per QUERY head, the bias on every key (masked keys stay masked) and lse including it.

Bounds (as tests/test_fuzz_attention.py): fp16/bf16 by the 2x rule against `pt` (the oracle in
the input dtype: matmuls in the dtype, softmax in fp32), fp32 tight against fp64 plus twice the
fp32 oracle's own error (huge logits are ill-conditioned whoever computes them); gradients
also get what a flash backward's stored O and fp32 lse add (fuzz_support.attention_rounding).

The seeded random-configuration fuzz of the same paths is tests/test_fuzz_alibi_cpu.py.
"""

import math

import pytest
import torch

from fastattn import _C_ops
from fuzz_support import attention_rounding, masked_softmax, visible
from tolerances import (ATTENTION_FP32, ATTENTION_FUZZ_LSE, EPS, LOW_PRECISION, bound_2x,
                        floor_for, max_err, max_relative_bound)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ------------------------------------------------------------------------------------ oracle


def alibi_bias(slopes, sq, sk, off):
    """-slope[b, h] * |i + off - j|  (B, H, Sq, Sk) in slopes' dtype."""
    i = torch.arange(sq, dtype=slopes.dtype).view(-1, 1)
    j = torch.arange(sk, dtype=slopes.dtype).view(1, -1)
    return -slopes[..., None, None] * (i + off - j).abs()


def oracle(q, k, v, slopes, *, scale, causal, off, wl=-1, wr=-1, softcap=0.0,
           key_lengths=None, float_mask=None, fp64=True):
    """out (B, H, Sq, D), lse (B, H, Sq), P (B, H, Sq, Sk); differentiable in q, k, v.
    fp64: everything in float64; else q k^T and P v in the input dtype, the rest in fp32."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if sk == 0:  # nothing to attend: zero rows, lse -inf
        dt = torch.float64 if fp64 else q.dtype
        return (q.new_zeros(b, h, sq, d, dtype=dt) + 0 * q.sum(),
                torch.full((b, h, sq), float("-inf"), dtype=torch.float64),
                torch.zeros(b, h, sq, 0, dtype=torch.float64))
    kk, vv = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    if fp64:
        q, kk, vv = q.double(), kk.double(), vv.double()
    s = torch.matmul(q, kk.transpose(-2, -1))
    s = (s.double() if fp64 else s.float()) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        s = s + alibi_bias(slopes.to(s.dtype), sq, sk, off)
    if float_mask is not None:
        s = s + float_mask.to(s.dtype)
    vis = visible(sq, sk, off, causal, wl, wr).expand(b, h, sq, sk)
    if key_lengths is not None:
        vis = vis & (torch.arange(sk).view(1, 1, 1, sk) < key_lengths.view(b, 1, 1, 1))
    p, lse = masked_softmax(s, vis)
    out = torch.matmul(p if fp64 else p.to(vv.dtype), vv)
    return out, lse.double(), p.detach().double()


def grads(out, dout, leaves):
    g = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
    return [torch.zeros_like(t) if x is None else x for x, t in zip(g, leaves)]


def leaves_like(ts, fp64):
    return [t.detach().double().requires_grad_() if fp64 else t.detach().clone().requires_grad_()
            for t in ts]

# ------------------------------------------------------------------------------------ checks


def check(name, got, ref, pt, what, extra=0.0):
    """fp16/bf16: max|got - ref| <= 2 max|pt - ref| + floor (+ extra); fp32: tight against
    fp64 plus twice the fp32 oracle's own error (+ extra). Every value finite."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}, {what}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values, {what}"
    err = max_err(got, ref)
    if got.dtype in LOW_PRECISION and not torch.isfinite(pt).all():
        # the dtype oracle itself overflows (fp16 gradients at huge scales): two ulps instead
        bound = max_relative_bound(ref, floor_for(got.dtype), 2 * EPS[got.dtype])
    elif got.dtype in LOW_PRECISION:
        bound = bound_2x(pt, ref, floor_for(got.dtype)) + extra
    else:
        bound = max_relative_bound(ref, **ATTENTION_FP32) + 2 * max_err(pt, ref) + extra
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}, {what}"


def check_lse(got, ref, what):
    got = got.double()
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), f"lse: -inf rows differ, {what}"
    fin = torch.isfinite(ref)
    assert not torch.isnan(got).any() and not torch.isposinf(got).any(), f"lse: NaN/+inf, {what}"
    if fin.any():
        err = max_err(got[fin], ref[fin])
        bound = max_relative_bound(ref[fin], **ATTENTION_FUZZ_LSE)
        assert err <= bound, f"lse: max error {err:.3g} > {bound:.3g}, {what}"

# ------------------------------------------------------------------------------------ inputs


def slopes_for(gen, b, h, kind="per_batch"):
    """float32 (B, H) contiguous: the ALiBi geometric slopes of H heads expanded over the batch
    ("per_head", what an (H,) argument becomes), or random different values per (b, h),
    some 0 and some negative ("per_batch")."""
    if kind == "per_head":
        base = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])
        return base.expand(b, h).contiguous()
    s = torch.rand(b, h, generator=gen) * 1.5
    s[torch.rand(b, h, generator=gen) < 0.1] = 0.0
    s[torch.rand(b, h, generator=gen) < 0.1] *= -0.05
    return s.float().contiguous()


def randn(gen, *shape, dtype, mul=1.0):
    return (torch.randn(*shape, generator=gen) * mul).to(dtype)

# -------------------------------------------------------------------------------- dense path


def run_dense_case(*, dtype, B, H, Hkv, Sq, Sk, D, causal, bottom_right, wl=-1, wr=-1,
                   softcap=0.0, scale=None, logit_mul=1.0, slope_kind="per_batch",
                   key_lengths=False, float_mask=False, seq_major=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = randn(gen, B, H, Sq, D, dtype=dtype, mul=logit_mul)
    k = randn(gen, B, Hkv, Sk, D, dtype=dtype, mul=logit_mul)
    v = randn(gen, B, Hkv, Sk, D, dtype=dtype)
    dout = randn(gen, B, H, Sq, D, dtype=dtype)
    if seq_major:  # (B, S, H, D) storage: strided rows
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    slopes = slopes_for(gen, B, H, slope_kind)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kl = torch.randint(0, Sk + 1, (B,), generator=gen) if key_lengths else None
    fm = (torch.randn(B, H, Sq, Sk, generator=gen) * 2).to(dtype) if float_mask else None
    off = Sk - Sq if bottom_right else 0
    kw = dict(mask=fm, scale=scale, causal=causal,
              alignment="bottom_right" if bottom_right else "top_left", window_left=wl,
              window_right=wr, softcap=softcap, key_lengths=kl, dropout_p=0.0, seed=0,
              offset=0, alibi_slopes=slopes)
    out, lse = _C_ops.attention_forward(q, k, v, **kw)
    dq, dk, dv, _ = _C_ops.attention_backward(dout, q, k, v, out, lse, deterministic=False,
                                              mask_needs_grad=False, **kw)
    okw = dict(scale=scale, causal=causal, off=off, wl=wl, wr=wr, softcap=softcap,
               key_lengths=kl, float_mask=fm)
    l64 = leaves_like((q, k, v), True)
    ref, ref_lse, ref_p = oracle(*l64, slopes, fp64=True, **okw)
    ref_g = grads(ref, dout.double(), l64)
    lpt = leaves_like((q, k, v), False)
    pt, _, _ = oracle(*lpt, slopes, fp64=False, **okw)
    pt_g = grads(pt, dout, lpt)
    what = (f"dense dtype={dtype} B={B} H={H} Hkv={Hkv} Sq={Sq} Sk={Sk} D={D} causal={causal} "
            f"bottom_right={bottom_right} window=({wl}, {wr}) softcap={softcap} scale={scale} "
            f"logit_mul={logit_mul} slopes={slope_kind} key_lengths={key_lengths} "
            f"float_mask={float_mask} seq_major={seq_major} seed={seed}")
    check("out", out, ref, pt, what)
    check_lse(lse, ref_lse, what)
    extra = attention_rounding(out, ref, ref_lse, dout, ref_p, q, k, v, scale, 0.0)
    for name, g, rg, pg in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, pt_g):
        check(name, g, rg, pg, what, extra[name])


DENSE_CASES = {
    # name: (B, H, Hkv, Sq, Sk, D, causal, bottom_right, (wl, wr), softcap)
    "causal_top_left_multi_tile": (2, 4, 2, 130, 130, 72, True, False, (-1, -1), 0.0),
    "causal_bottom_right_sq_lt_sk": (1, 3, 1, 37, 150, 40, True, True, (-1, -1), 0.0),
    "full_top_left_sq_gt_sk": (2, 2, 2, 130, 37, 72, False, False, (-1, -1), 0.0),
    "full_bottom_right_sq_gt_sk": (2, 2, 1, 97, 33, 16, False, True, (-1, -1), 0.0),
    "window_bottom_right": (1, 4, 2, 70, 140, 64, False, True, (16, 3), 0.0),
    "window_causal_top_left": (2, 2, 2, 130, 130, 24, True, False, (7, -1), 0.0),
    "softcap_gqa": (2, 4, 1, 65, 129, 72, True, True, (-1, -1), 30.0),
    "long_keys_several_forward_blocks": (1, 2, 1, 70, 600, 32, False, True, (-1, -1), 0.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_alibi(name, dtype):
    B, H, Hkv, Sq, Sk, D, causal, br, (wl, wr), softcap = DENSE_CASES[name]
    run_dense_case(dtype=dtype, B=B, H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, causal=causal,
                   bottom_right=br, wl=wl, wr=wr, softcap=softcap, seed=len(name))


@pytest.mark.parametrize("slope_kind", ["per_head", "per_batch"])
def test_dense_alibi_slopes_per_head_and_per_batch(slope_kind):
    run_dense_case(dtype=torch.float32, B=3, H=4, Hkv=2, Sq=33, Sk=45, D=16, causal=True,
                   bottom_right=True, slope_kind=slope_kind, seed=3)


def test_dense_alibi_with_key_lengths_and_float_mask():
    run_dense_case(dtype=torch.float32, B=3, H=2, Hkv=1, Sq=40, Sk=70, D=24, causal=False,
                   bottom_right=False, key_lengths=True, float_mask=True, seq_major=True, seed=4)


def test_alibi_changes_the_result():
    """The bias is applied: without it the output is different (guards the oracle and the
    kernel against both ignoring the slopes)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(3))
    kw = dict(mask=None, scale=0.25, causal=False, alignment="top_left", window_left=-1,
              window_right=-1, softcap=0.0, key_lengths=None, dropout_p=0.0, seed=0, offset=0)
    plain, _ = _C_ops.attention_forward(q, k, v, **kw)
    biased, _ = _C_ops.attention_forward(q, k, v, alibi_slopes=torch.ones(1, 2), **kw)
    assert max_err(plain, biased) > 0.1
    ref, _, _ = oracle(q, k, v, torch.ones(1, 2), scale=0.25, causal=False, off=0)
    assert max_err(biased, ref) < 1e-5

# ------------------------------------------------------------------------------- varlen path


def run_varlen_case(*, dtype, lens_q, lens_k, H, Hkv, D, causal, wl=-1, wr=-1, softcap=0.0,
                    scale=None, logit_mul=1.0, slope_kind="per_batch", seed=0):
    gen = torch.Generator().manual_seed(seed)
    nb = len(lens_q)
    tq, tk = sum(lens_q), sum(lens_k)
    q = randn(gen, tq, H, D, dtype=dtype, mul=logit_mul)
    k = randn(gen, tk, Hkv, D, dtype=dtype, mul=logit_mul)
    v = randn(gen, tk, Hkv, D, dtype=dtype)
    dout = randn(gen, tq, H, D, dtype=dtype)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    slopes = slopes_for(gen, nb, H, slope_kind)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kw = dict(scale=scale, causal=causal, window_left=wl, window_right=wr, softcap=softcap,
              dropout_p=0.0, seed=0, offset=0, alibi_slopes=slopes)
    mq, mk = max(lens_q), max(lens_k)
    out, lse = _C_ops.varlen_forward(q, k, v, cu_q, cu_k, mq, mk, **kw)
    dq, dk, dv = _C_ops.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk,
                                        deterministic=False, **kw)
    what = (f"varlen dtype={dtype} lens_q={lens_q} lens_k={lens_k} H={H} Hkv={Hkv} D={D} "
            f"causal={causal} window=({wl}, {wr}) softcap={softcap} scale={scale} "
            f"logit_mul={logit_mul} slopes={slope_kind} seed={seed}")

    def per_sequence(fp64):
        """Packed out (total_q, H, D), lse (H, total_q), grads, and each sequence's
        (slices, P) for the rounding bound."""
        leaves = leaves_like((q, k, v), fp64)
        outs, lses, parts = [], [], []
        for b in range(nb):
            sq_, sk_ = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
            qs, ks, vs = (t[s].transpose(0, 1)[None] for t, s in zip(leaves, (sq_, sk_, sk_)))
            o, l, p = oracle(qs, ks, vs, slopes[b:b + 1], scale=scale, causal=causal,
                             off=lens_k[b] - lens_q[b], wl=wl, wr=wr, softcap=softcap,
                             fp64=fp64)
            outs.append(o[0].transpose(0, 1))
            lses.append(l[0])
            parts.append((sq_, sk_, l, p))
        o = torch.cat(outs, 0)
        return o, torch.cat(lses, 1), grads(o, dout, leaves), parts

    ref, ref_lse, ref_g, parts = per_sequence(True)
    pt, _, pt_g, _ = per_sequence(False)
    check("out", out, ref, pt, what)
    check_lse(lse, ref_lse, what)
    # the rounding bound of the flash backward, per sequence, worst one
    extra = {"dq": 0.0, "dk": 0.0, "dv": 0.0}
    dense = lambda t, s: t[s].transpose(0, 1)[None]
    for sq_, sk_, l, p in parts:
        if sq_.stop == sq_.start or sk_.stop == sk_.start:
            continue
        e = attention_rounding(dense(out, sq_), dense(ref, sq_), l, dense(dout, sq_), p,
                               dense(q, sq_), dense(k, sk_), dense(v, sk_), scale, 0.0)
        extra = {n: max(extra[n], e[n]) for n in extra}
    for name, g, rg, pg in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, pt_g):
        check(name, g, rg, pg, what, extra[name])


VARLEN_CASES = {
    # name: (lens_q, lens_k, H, Hkv, D, causal, (wl, wr), softcap)
    "ragged_causal_gqa": ([0, 1, 37, 130, 5], [3, 1, 130, 37, 0], 4, 2, 72, True, (-1, -1), 0.0),
    "ragged_full": ([7, 0, 64, 1], [9, 5, 130, 1], 2, 1, 40, False, (-1, -1), 0.0),
    "window_softcap": ([33, 130, 2], [70, 97, 2], 2, 2, 24, False, (11, 4), 50.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen_alibi(name, dtype):
    lens_q, lens_k, H, Hkv, D, causal, (wl, wr), softcap = VARLEN_CASES[name]
    run_varlen_case(dtype=dtype, lens_q=lens_q, lens_k=lens_k, H=H, Hkv=Hkv, D=D,
                    causal=causal, wl=wl, wr=wr, softcap=softcap, seed=len(name))

# ------------------------------------------------------------------------------ kvcache path


def run_kvcache_case(*, dtype, lens, Sq, H, Hkv, D, s_new=0, block_size=None, causal=True,
                     wl=-1, wr=-1, softcap=0.0, scale=None, logit_mul=1.0,
                     slope_kind="per_batch", seed=0):
    """Cache positions [0, lens[b] + s_new) are filled (the kernel reads, the caller appends);
    query i of batch b sits at position lens[b] + s_new - Sq + i."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lens)
    need = max(lens) + s_new
    if block_size is None:  # contiguous (B, S_max, Hkv, D), one spare row
        shape = (B, need + 1, Hkv, D)
        table = None
    else:                   # pages in a shuffled order, spare pages
        max_blocks = max(1, -(-need // block_size))
        n_pages = B * max_blocks + 2
        table = torch.randperm(n_pages, generator=gen)[:B * max_blocks].view(B, max_blocks)
        table = table.to(torch.int32)
        shape = (n_pages, block_size, Hkv, D)
    kc = randn(gen, *shape, dtype=dtype, mul=logit_mul)
    vc = randn(gen, *shape, dtype=dtype)
    q = randn(gen, B, Sq, H, D, dtype=dtype, mul=logit_mul)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    slopes = slopes_for(gen, B, H, slope_kind)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out, lse = _C_ops.kvcache_attention_forward(
        q, kc, vc, cache_seqlens=seqlens, seqlen_new=s_new, block_table=table,
        cache_batch_idx=None, scale=scale, causal=causal, window_left=wl, window_right=wr,
        softcap=softcap, alibi_slopes=slopes)
    what = (f"kvcache dtype={dtype} lens={lens} s_new={s_new} Sq={Sq} H={H} Hkv={Hkv} D={D} "
            f"block_size={block_size} causal={causal} window=({wl}, {wr}) softcap={softcap} "
            f"scale={scale} logit_mul={logit_mul} slopes={slope_kind} seed={seed}")

    def batched(fp64):
        outs, lses = [], []
        for b in range(B):
            L = lens[b] + s_new
            n = torch.arange(L)
            if table is None:
                K, V = kc[b, :L], vc[b, :L]
            else:
                pages, rows = table[b].long()[n // block_size], n % block_size
                K, V = kc[pages, rows], vc[pages, rows]                    # (L, Hkv, D)
            o, l, _ = oracle(q[b].transpose(0, 1)[None], K.transpose(0, 1)[None],
                             V.transpose(0, 1)[None], slopes[b:b + 1], scale=scale,
                             causal=causal, off=L - Sq, wl=wl, wr=wr, softcap=softcap,
                             fp64=fp64)
            outs.append(o[0].transpose(0, 1))
            lses.append(l[0])
        return torch.stack(outs), torch.stack(lses)

    with torch.no_grad():
        ref, ref_lse = batched(True)
        pt, _ = batched(False)
    check("out", out, ref, pt, what)
    check_lse(lse, ref_lse, what)


KVCACHE_CASES = {
    # name: (lens, Sq, s_new, H, Hkv, D, block_size, causal, (wl, wr), softcap)
    "decode_contiguous": ([0, 7, 100], 1, 0, 8, 2, 64, None, True, (-1, -1), 0.0),
    "decode_paged_gqa": ([13, 40, 1], 1, 0, 8, 2, 72, 7, True, (-1, -1), 0.0),
    "append_paged_window": ([5, 61], 3, 3, 4, 4, 40, 6, True, (20, 0), 0.0),
    "multi_query_softcap": ([30, 9], 4, 2, 6, 3, 24, None, True, (-1, -1), 30.0),
    "long_cache_split_k": ([700, 650], 1, 1, 4, 1, 64, 16, True, (-1, -1), 0.0),
    "not_causal": ([17, 0], 2, 0, 2, 1, 16, 5, False, (-1, -1), 0.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(KVCACHE_CASES))
def test_kvcache_alibi(name, dtype):
    lens, Sq, s_new, H, Hkv, D, bs, causal, (wl, wr), softcap = KVCACHE_CASES[name]
    run_kvcache_case(dtype=dtype, lens=lens, Sq=Sq, s_new=s_new, H=H, Hkv=Hkv, D=D,
                     block_size=bs, causal=causal, wl=wl, wr=wr, softcap=softcap,
                     seed=len(name))

# ------------------------------------------------------------------------ entry checks


def _dense_call(slopes):
    q = torch.randn(2, 4, 8, 16)
    k = v = torch.randn(2, 2, 8, 16)
    return torch.ops.fastattn_kernels.attention_forward(
        q, k, v, None, 0.25, False, False, -1, -1, 0.0, None, 0.0, 0, 0, slopes)


@pytest.mark.parametrize("bad,match", [
    (torch.ones(2, 4, dtype=torch.float64), "float32"),
    (torch.ones(4), r"shape \(B, H\)"),
    (torch.ones(2, 3), r"shape \(B, H\)"),
    (torch.ones(4, 2).t(), "contiguous"),
])
def test_kernel_checks_alibi_slopes(bad, match):
    with pytest.raises(RuntimeError, match=f"alibi_slopes must.*{match}"):
        _dense_call(bad)


def test_kernel_ops_default_to_no_alibi():
    """The new argument is last and defaults to None: callers without it keep working and
    get the same result as an explicit None."""
    q = torch.randn(2, 4, 8, 16)
    k = v = torch.randn(2, 2, 8, 16)
    args = (q, k, v, None, 0.25, True, False, -1, -1, 0.0, None, 0.0, 0, 0)
    a, la = torch.ops.fastattn_kernels.attention_forward(*args)
    b, lb = torch.ops.fastattn_kernels.attention_forward(*args, None)
    assert torch.equal(a, b) and torch.equal(la, lb)
    for name in ("attention_forward", "attention_backward", "varlen_attention_forward",
                 "varlen_attention_backward", "kvcache_attention_forward"):
        schema = getattr(torch.ops.fastattn_kernels, name).default._schema
        last = schema.arguments[-1]
        assert last.name == "alibi_slopes" and str(last.type) == "Optional[Tensor]", name


def test_unsupported_reports_alibi():
    """The cpu kernels take ALiBi; the CUDA backend never does (the selector then picks
    triton); ops without an ALiBi kernel say so."""
    for op in ("attention", "varlen_attention", "kvcache_attention"):
        assert _C_ops.unsupported(op, device="cpu", dtype=torch.float32, alibi=True) is None
        assert _C_ops.unsupported(op, device="cuda", dtype=torch.float32, alibi=True) \
            is not None
    assert "alibi" in _C_ops.unsupported("softmax", device="cpu", dtype=torch.float32,
                                         alibi=True)
