"""fastattn.flash_attn: flash-attn 2's functions, checked against a float64 oracle written from
flash-attn's documented semantics (bottom-right causal and windows, softcap, GQA)."""

import math

import pytest
import torch

import fastattn
from fastattn import flash_attn as fa

from conftest import backend_device
from tolerances import FP32_TOL, ROTATED_CACHE_FP32_TOL, assert_within_2x


def oracle(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> (B, Sq, H, D) float64; flash-attn's rules."""
    q, k, v = (t.double() for t in (q, k, v))
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq).view(-1, 1) + (sk - sq)                  # bottom-right diagonal
    j = torch.arange(sk).view(1, -1)
    visible = torch.ones(sq, sk, dtype=torch.bool)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                  # empty rows -> 0
    return torch.einsum("bhij,bjhd->bihd", p, v)


CASES = [
    # (B, Sq, Sk, H, Hkv, D, causal, window, softcap)
    (2, 7, 7, 4, 4, 16, False, (-1, -1), 0.0),
    (1, 5, 33, 4, 2, 40, True, (-1, -1), 0.0),        # decode-like Sq < Sk: bottom-right
    (2, 33, 5, 2, 1, 64, True, (-1, -1), 0.0),        # Sq > Sk: the first rows see nothing
    (1, 97, 97, 6, 3, 32, False, (8, 3), 0.0),
    (2, 17, 40, 4, 1, 16, True, (4, -1), 30.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_attn_func_matches_oracle(case, dtype, backend):
    b, sq, sk, h, hkv, d, causal, window, softcap = case
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, sq, h, d, generator=g).to(dev, dtype).requires_grad_()
    k = torch.randn(b, sk, hkv, d, generator=g).to(dev, dtype).requires_grad_()
    v = torch.randn(b, sk, hkv, d, generator=g).to(dev, dtype).requires_grad_()
    out = fa.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap)
    assert out.shape == (b, sq, h, d) and out.is_contiguous()
    dout = torch.randn(out.shape, generator=g).to(dev, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(qr, kr, vr, causal=causal, window=window, softcap=softcap)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    pt = oracle(qp, kp, vp, causal=causal, window=window, softcap=softcap).to(dtype)
    pt_grads = torch.autograd.grad(pt, (qp, kp, vp), dout)
    assert_within_2x(out, ref.to(out.dtype) if dtype == torch.float32 else ref, pt, name="out")
    for name, a, r, p in zip("qkv", grads, ref_grads, pt_grads):
        assert_within_2x(a, r.to(a.dtype) if dtype == torch.float32 else r, p, name=f"d{name}")


def test_packed_variants_equal_unpacked():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 19, 3, 4, 32, generator=g, requires_grad=True)
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(5, 0))
    q, k, v = qkv.detach().unbind(2)
    ref = fa.flash_attn_func(q, k, v, causal=True, window_size=(5, 0))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    assert qkv.grad.abs().sum() > 0

    qq = torch.randn(2, 6, 4, 32, generator=g)
    kv = torch.randn(2, 19, 2, 2, 32, generator=g)
    out = fa.flash_attn_kvpacked_func(qq, kv, causal=True)
    ref = fa.flash_attn_func(qq, kv[:, :, 0], kv[:, :, 1], causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_runs_on_fastattn_kernels():
    q = torch.randn(1, 9, 2, 16)
    with fastattn.record_dispatch() as calls:
        fa.flash_attn_func(q, q, q, causal=True)
    assert calls and all(backend != "torch" for _, backend in calls), calls


@pytest.mark.parametrize("kwargs, name", [
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),      # nheads is 2
    (dict(return_attn_probs=True), "return_attn_probs"),
    (dict(window_size=(3,)), "window_size"),
])
def test_unsupported_arguments_raise_naming_them(kwargs, name):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=name):
        fa.flash_attn_func(q, q, q, **kwargs)


def test_bad_layout_names_the_argument():
    with pytest.raises(ValueError, match="qkv"):
        fa.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 16))
    with pytest.raises(ValueError, match="^q "):
        fa.flash_attn_func(torch.randn(4, 2, 16), torch.randn(1, 4, 2, 16),
                           torch.randn(1, 4, 2, 16))


# ------------------------------------------------------------------------- varlen and KV cache

def _packed(lengths, heads, d, g):
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return torch.randn(total, heads, d, generator=g), cu


def test_varlen_func_equals_dense_per_sequence():
    g = torch.Generator().manual_seed(2)
    len_q, len_k = [3, 1, 0, 17, 4], [5, 1, 0, 9, 0]
    q, cu_q = _packed(len_q, 4, 32, g)
    k, cu_k = _packed(len_k, 2, 32, g)
    v = torch.randn(k.shape, generator=g)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(len_q), max(len_k), causal=True,
                                    window_size=(6, -1), softcap=20.0)
    assert out.shape == q.shape
    for b in range(len(len_q)):
        qa, qe, ka, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if qe == qa:
            continue
        if ke == ka:                                     # no keys: the rows are 0
            assert out[qa:qe].abs().max() == 0
            continue
        ref = oracle(q[None, qa:qe], k[None, ka:ke], v[None, ka:ke], causal=True,
                     window=(6, -1), softcap=20.0)[0]
        torch.testing.assert_close(out[qa:qe].double(), ref, **FP32_TOL)


def test_varlen_packed_variants_equal_unpacked():
    g = torch.Generator().manual_seed(3)
    lengths = [7, 2, 11]
    qkv = torch.randn(sum(lengths), 3, 2, 16, generator=g)
    cu = torch.tensor([0, 7, 9, 20], dtype=torch.int32)
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 11, causal=True)
    ref = fa.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 11, 11, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out = fa.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 11, 11)
    ref = fa.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 11, 11)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_with_kvcache_appends_and_attends(causal):
    g = torch.Generator().manual_seed(4)
    b, s_max, h, hkv, d, new = 3, 40, 4, 2, 32, 2
    k_cache = torch.randn(b, s_max, hkv, d, generator=g)
    v_cache = torch.randn(b, s_max, hkv, d, generator=g)
    lens = torch.tensor([0, 5, 31], dtype=torch.int32)
    q = torch.randn(b, new, h, d, generator=g)
    k = torch.randn(b, new, hkv, d, generator=g)
    v = torch.randn(b, new, hkv, d, generator=g)
    cos, sin = fastattn.rotary_cache(64, 16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos,
                                          rotary_sin=sin, cache_seqlens=lens, causal=causal,
                                          rotary_interleaved=False, return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (b, h, new)
    for i in range(b):
        n = int(lens[i])
        pos = torch.arange(n, n + new)
        # flash-attn's rule: k at cache_seqlens + t; q the same when causal, else all at n
        k_rot = fastattn.apply_rotary(k[i:i + 1], cos, sin, seq_dim=1,
                                      offsets=torch.tensor([n]))[0]
        q_pos = pos if causal else torch.full((new,), n)
        q_rot = torch.stack([fastattn.apply_rotary(q[i:i + 1, t:t + 1], cos, sin, seq_dim=1,
                                                   offsets=q_pos[t:t + 1])[0, 0]
                             for t in range(new)])
        k_ref[i, n:n + new], v_ref[i, n:n + new] = k_rot, v[i]
        torch.testing.assert_close(k_cache[i, :n + new], k_ref[i, :n + new],
                                   **ROTATED_CACHE_FP32_TOL)
        torch.testing.assert_close(v_cache[i], v_ref[i], atol=0, rtol=0)
        ref = oracle(q_rot[None], k_ref[i:i + 1, :n + new], v_ref[i:i + 1, :n + new],
                     causal=causal)[0]
        torch.testing.assert_close(out[i].double(), ref, **FP32_TOL)


@pytest.mark.parametrize("kwargs, name", [
    (dict(cache_leftpad=torch.zeros(1, dtype=torch.int32)), "cache_leftpad"),
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),      # nheads is 2
    (dict(num_splits=-1), "num_splits"),
])
def test_with_kvcache_unsupported_arguments_raise(kwargs, name):
    q = torch.randn(1, 1, 2, 16)
    cache = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=name):
        fa.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3, **kwargs)


def test_varlen_block_table_raises():
    q = torch.randn(4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table"):
        fa.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, block_table=torch.zeros(1, 1))
