"""The oracle itself, checked against PyTorch built-ins or independently written formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastattn import reference
from tolerances import TIGHT_FP32_TOL

torch.manual_seed(0)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 9), (1, 4)])
def test_attention_matches_sdpa(causal, sq, sk):
    q, k, v = rand(2, 3, sq, 16), rand(2, 3, sk, 16), rand(2, 3, sk, 16)
    out = reference.attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_attention_masks_scale_and_gqa_match_sdpa():
    q, k, v = rand(2, 4, 6, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    bool_mask = torch.rand(2, 1, 6, 9) > 0.3
    bool_mask[..., 0] = True
    float_mask = rand(6, 9)
    for mask in (bool_mask, float_mask):
        out = reference.attention(q, k, v, mask=mask, scale=0.3)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                                  enable_gqa=True)
        torch.testing.assert_close(out, expected)


def test_attention_bottom_right_causal_and_window_by_loops():
    sq, sk, d = 4, 7, 5
    q, k, v = rand(1, 1, sq, d), rand(1, 1, sk, d), rand(1, 1, sk, d)
    out, lse = reference.attention(q, k, v, causal=True, alignment="bottom_right",
                                   window_left=2, softcap=2.0, return_lse=True)
    for i in range(sq):
        keys = [j for j in range(sk) if i + sk - sq - 2 <= j <= i + sk - sq]
        s = torch.stack([(q[0, 0, i] @ k[0, 0, j]) / math.sqrt(d) for j in keys])
        s = 2.0 * torch.tanh(s / 2.0)
        p = torch.softmax(s, 0)
        torch.testing.assert_close(out[0, 0, i], sum(p[n] * v[0, 0, j] for n, j in enumerate(keys)))
        torch.testing.assert_close(lse[0, 0, i], torch.logsumexp(s, 0).float())


def test_attention_fully_masked_rows_give_zero_and_finite_grads():
    q, k, v = (rand(1, 2, 3, 4).requires_grad_() for _ in range(3))
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    key_lengths = torch.tensor([3])
    out, lse = reference.attention(q, k, v, mask=mask, key_lengths=key_lengths, return_lse=True)
    assert torch.all(out[:, :, 1] == 0) and torch.isneginf(lse[:, :, 1]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 1] == 0)


def test_attention_key_lengths_equal_bool_mask():
    q, k, v = rand(2, 2, 3, 4), rand(2, 2, 6, 4), rand(2, 2, 6, 4)
    lengths = torch.tensor([2, 6])
    mask = torch.arange(6).view(1, 1, 1, 6) < lengths.view(2, 1, 1, 1)
    torch.testing.assert_close(reference.attention(q, k, v, key_lengths=lengths),
                               reference.attention(q, k, v, mask=mask))


def test_attention_weights_sum_to_one():
    q, k = rand(1, 2, 5, 4), rand(1, 2, 5, 4)
    w = reference.attention_weights(q, k, causal=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 5, dtype=w.dtype))
    assert torch.all(w.triu(1) == 0)


def test_softmax():
    x = rand(3, 5, 7)
    torch.testing.assert_close(reference.softmax(x, 1, scale=0.5), torch.softmax(0.5 * x, 1))
    mask = torch.rand(5, 7) > 0.5
    mask[2] = False
    y = reference.softmax(x, mask=mask, causal=True)
    keep = mask & torch.ones(5, 7, dtype=torch.bool).tril()
    expected = torch.softmax(x.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0)
    torch.testing.assert_close(y, expected)
    assert torch.all(y[:, 2] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norm_and_rms_norm_match_functional(dtype):
    x, w, b = rand(4, 3, 33, dtype=dtype), rand(33, dtype=dtype), rand(33, dtype=dtype)
    tol = dict(**TIGHT_FP32_TOL) if dtype == torch.float32 else {}
    torch.testing.assert_close(reference.layer_norm(x, 33, w, b, 1e-5),
                               F.layer_norm(x, (33,), w, b, 1e-5), **tol)
    torch.testing.assert_close(reference.rms_norm(x, (3, 33), None, 1e-6),
                               F.rms_norm(x, (3, 33), None, 1e-6), **tol)
    r = rand(4, 3, 33, dtype=dtype)
    y, h = reference.rms_norm(x, 33, w, None, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (33,), w, None), **tol)


def test_rotary_neox_matches_rotate_half_and_gptj_matches_complex():
    cos, sin = reference.rotary_cache(12, 8, dtype=torch.float64)
    x = rand(2, 3, 12, 8)
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    torch.testing.assert_close(reference.apply_rotary(x, cos, sin),
                               reference.rotate_half_rope(x, full_cos, full_sin))
    y = reference.apply_rotary(x, cos, sin, interleaved=True)
    z = torch.view_as_complex(x.reshape(2, 3, 12, 4, 2).contiguous())
    rot = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))
    torch.testing.assert_close(y, torch.view_as_real(z * rot).reshape(2, 3, 12, 8))


def test_rotary_partial_offsets_and_conjugate():
    cos, sin = reference.rotary_cache(20, 4, dtype=torch.float64)
    x = rand(2, 5, 3, 10)                                       # (B, S, H, D), seq_dim=1
    offsets = torch.tensor([0, 7])
    y = reference.apply_rotary(x, cos, sin, seq_dim=1, offsets=offsets)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    shifted = reference.apply_rotary(x[1:], cos[7:], sin[7:], seq_dim=1)
    torch.testing.assert_close(y[1:], shifted)
    back = reference.apply_rotary(y, cos, sin, seq_dim=1, offsets=offsets, conjugate=True)
    torch.testing.assert_close(back, x)


def test_rotary_cache_scaling():
    cos, sin = reference.rotary_cache(8, 6, base=100.0, dtype=torch.float64)
    inv = 1.0 / 100.0 ** (torch.arange(0, 6, 2, dtype=torch.float64) / 6)
    torch.testing.assert_close(cos, torch.cos(torch.outer(torch.arange(8.0, dtype=torch.float64), inv)))
    lin_cos, _ = reference.rotary_cache(8, 6, base=100.0, scaling=("linear", 2.0),
                                        dtype=torch.float64)
    torch.testing.assert_close(lin_cos[2], cos[1])
    ntk_cos, _ = reference.rotary_cache(8, 6, base=100.0, scaling=("ntk", 4.0),
                                        dtype=torch.float64)
    inv_ntk = 1.0 / (100.0 * 4.0 ** (6 / 4)) ** (torch.arange(0, 6, 2, dtype=torch.float64) / 6)
    torch.testing.assert_close(ntk_cos[3], torch.cos(3 * inv_ntk))
    with pytest.raises(ValueError, match="scaling"):
        reference.rotary_cache(8, 6, scaling=("yarn", 2.0))
