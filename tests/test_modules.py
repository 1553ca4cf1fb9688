"""LayerNorm, RMSNorm and RotaryEmbedding as drop-ins, MultiHeadAttention's keyword-only
extensions (rotary, GQA, window) against a plain-PyTorch composition of the reference ops,
and state_dict round trips with the PyTorch modules."""

import math

import pytest
import torch
import torch.nn as nn

import fastattn
from fastattn import reference

from conftest import TESTABLE_BACKENDS, backend_device
from tolerances import COMPOSED_FP32_GRAD_TOL, COMPOSED_FP32_TOL



def grads_of(module, x, seed=0):
    out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    params = list(module.parameters())
    grads = torch.autograd.grad((out * g).sum(), [x] + params)
    return out, grads


# ------------------------------------------------------------------ norms

NORM_CASES = [
    (nn.LayerNorm, fastattn.LayerNorm, dict(normalized_shape=33)),
    (nn.LayerNorm, fastattn.LayerNorm, dict(normalized_shape=(3, 8), eps=1e-3)),
    (nn.LayerNorm, fastattn.LayerNorm, dict(normalized_shape=16, bias=False)),
    (nn.LayerNorm, fastattn.LayerNorm, dict(normalized_shape=16, elementwise_affine=False)),
    (nn.RMSNorm, fastattn.RMSNorm, dict(normalized_shape=33)),
    (nn.RMSNorm, fastattn.RMSNorm, dict(normalized_shape=[3, 8], eps=1e-6)),
    (nn.RMSNorm, fastattn.RMSNorm, dict(normalized_shape=16, elementwise_affine=False)),
]


@pytest.mark.parametrize("ref_cls,cls,kw", NORM_CASES,
                         ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_norm_drop_in(backend, ref_cls, cls, kw):
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = ref_cls(**kw, device=device)
    ours = cls(**kw, device=device)
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]     # same extra_repr
    assert isinstance(ours, ref_cls)
    with torch.no_grad():                                   # non-trivial affine parameters
        for p in ref.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    shape = (5, 7) + tuple(ref.normalized_shape)
    x = torch.randn(shape, device=device, requires_grad=True)
    with fastattn.record_dispatch() as calls:
        out, grads = grads_of(ours, x)
    out_ref, grads_ref = grads_of(ref, x)
    torch.testing.assert_close(out, out_ref, **COMPOSED_FP32_TOL)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **COMPOSED_FP32_GRAD_TOL)
    op = "layer_norm" if ref_cls is nn.LayerNorm else "rms_norm"
    assert (op, backend) in calls


def test_norm_bad_input():
    with pytest.raises(ValueError, match="normalized_shape"):
        fastattn.LayerNorm(8)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="normalized_shape"):
        fastattn.RMSNorm(8)(torch.randn(3, 7))


# ------------------------------------------------------------------ rotary embedding

@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dim", [8, 16])
def test_rotary_embedding(backend, interleaved, dim):
    device = backend_device(backend)
    rope = fastattn.RotaryEmbedding(dim, interleaved=interleaved, max_seq_len=4, device=device)
    q = torch.randn(2, 3, 11, 16, device=device)           # (B, H, S, D), grows the cache
    k = torch.randn(2, 1, 11, 16, device=device)
    qr, kr = rope(q, k)
    assert rope.max_seq_len >= 11 and rope.max_seq_len == 16
    cos, sin = fastattn.rotary_cache(11, dim, device=device)
    torch.testing.assert_close(qr, reference.apply_rotary(q, cos, sin, interleaved=interleaved))
    torch.testing.assert_close(kr, reference.apply_rotary(k, cos, sin, interleaved=interleaved))
    # position offsets (decoding): token s of batch b sits at s + offsets[b]
    offsets = torch.tensor([3, 20])
    qd, kd = rope(q[:, :, :2], k[:, :, :2], offsets=offsets)
    cos, sin = fastattn.rotary_cache(22, dim, device=device)
    torch.testing.assert_close(qd, reference.apply_rotary(q[:, :, :2], cos, sin,
                                                          interleaved=interleaved,
                                                          offsets=offsets))
    torch.testing.assert_close(kd, reference.apply_rotary(k[:, :, :2], cos, sin,
                                                          interleaved=interleaved,
                                                          offsets=offsets))
    assert rope.state_dict() == {}                         # the cache is not state


def test_rotary_embedding_seq_dim_and_scaling():
    rope = fastattn.RotaryEmbedding(8, scaling=("linear", 2.0), base=500.0)
    q = torch.randn(2, 6, 3, 8)                            # (B, S, H, D)
    k = torch.randn(2, 4, 3, 8)                            # another length: rotated alone
    qr, kr = rope(q, k, seq_dim=1)
    cos, sin = fastattn.rotary_cache(6, 8, base=500.0, scaling=("linear", 2.0))
    torch.testing.assert_close(qr, reference.apply_rotary(q, cos, sin, seq_dim=1))
    torch.testing.assert_close(kr, reference.apply_rotary(k, cos, sin, seq_dim=1))
    with pytest.raises(ValueError, match="dim"):
        fastattn.RotaryEmbedding(7)
    with pytest.raises(ValueError, match="dim"):
        rope(torch.randn(2, 4), torch.randn(2, 4))


# ------------------------------------------------------------------ MHA extensions

def reference_mha(m, x, *, causal, rotary_cos_sin=None):
    """Self-attention of an extended fastattn.MultiHeadAttention in plain PyTorch ops."""
    n, length, e = x.shape
    d, h, hkv = m.head_dim, m.num_heads, m.num_kv_heads
    qkv = nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias)
    q, k, v = qkv.split([e, hkv * d, hkv * d], dim=-1)
    q = q.view(n, length, h, d).transpose(1, 2)
    k = k.view(n, length, hkv, d).transpose(1, 2)
    v = v.view(n, length, hkv, d).transpose(1, 2)
    if rotary_cos_sin is not None:
        cos, sin = rotary_cos_sin
        q = reference.apply_rotary(q, cos, sin, interleaved=m.rotary.interleaved)
        k = reference.apply_rotary(k, cos, sin, interleaved=m.rotary.interleaved)
    wl, wr = m.window if m.window is not None else (-1, -1)
    out = reference.attention(q, k, v, causal=causal, window_left=wl, window_right=wr)
    w = reference.attention_weights(q, k, causal=causal, window_left=wl, window_right=wr)
    out = m.out_proj(out.transpose(1, 2).reshape(n, length, e))
    return out, w


EXTENSIONS = [
    dict(rotary=True),
    dict(num_kv_heads=2),
    dict(num_kv_heads=1, window=3),
    dict(window=(2, 1)),
    dict(rotary=True, num_kv_heads=2, window=(4, 0)),
    dict(rotary=fastattn.RotaryEmbedding(4, interleaved=True, base=100.0)),   # partial, GPT-J
]


@pytest.mark.parametrize("ext", EXTENSIONS, ids=lambda e: "-".join(
    f"{k}={v if not isinstance(v, nn.Module) else 'module'}" for k, v in e.items()))
def test_mha_extensions(backend, ext):
    device = backend_device(backend)
    torch.manual_seed(0)
    m = fastattn.MultiHeadAttention(32, 4, batch_first=True, device=device, **ext)
    x = torch.randn(2, 9, 32, device=device, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(9, device=device)
    cos_sin = (fastattn.rotary_cache(9, m.rotary.dim, base=m.rotary.base, device=device)
               if m.rotary else None)
    with fastattn.record_dispatch() as calls:
        out, w = m(x, x, x, attn_mask=mask, is_causal=True, average_attn_weights=False)
    out_ref, w_ref = reference_mha(m, x, causal=True, rotary_cos_sin=cos_sin)
    torch.testing.assert_close(out, out_ref, **COMPOSED_FP32_TOL)
    torch.testing.assert_close(w, w_ref, **COMPOSED_FP32_TOL)
    params = list(m.parameters())
    g = torch.autograd.grad(out.sum() + (w * w).sum(), [x] + params)
    g_ref = torch.autograd.grad(out_ref.sum() + (w_ref * w_ref).sum(), [x] + params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **COMPOSED_FP32_GRAD_TOL)
    assert ("attention", backend) in calls


def test_gqa_parameter_shapes_and_init():
    m = fastattn.MultiHeadAttention(32, 8, num_kv_heads=2, add_bias_kv=True)
    kv = 2 * 4
    assert m.in_proj_weight.shape == (32 + 2 * kv, 32)
    assert m.in_proj_bias.shape == (32 + 2 * kv,) and not m.in_proj_bias.any()
    assert m.bias_k.shape == (1, 1, kv)
    bound = math.sqrt(6 / (32 + 32 + 2 * kv))              # xavier_uniform_ like PyTorch's
    assert m.in_proj_weight.abs().max() <= bound
    m2 = fastattn.MultiHeadAttention(32, 8, num_kv_heads=4, kdim=10, vdim=12)
    assert m2.k_proj_weight.shape == (16, 10) and m2.v_proj_weight.shape == (16, 12)
    x, kv_in, v_in = torch.randn(3, 2, 32), torch.randn(5, 2, 10), torch.randn(5, 2, 12)
    out, w = m2(x, kv_in, v_in)
    assert out.shape == (3, 2, 32) and w.shape == (2, 3, 5)


# ------------------------------------------------------------------ state dicts

@pytest.mark.parametrize("kw", [dict(), dict(bias=False, add_bias_kv=True),
                                dict(kdim=10, vdim=12, add_zero_attn=True)])
def test_mha_state_dict_round_trip(kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, **kw)
    ours = fastattn.MultiHeadAttention(32, 4, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = nn.MultiheadAttention(32, 4, **kw)
    back.load_state_dict(ours.state_dict(), strict=True)
    for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert type(ours.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout",
                 "batch_first", "_qkv_same_embed_dim", "add_zero_attn"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                 "in_proj_bias", "bias_k", "bias_v"):
        assert (getattr(ours, attr) is None) == (getattr(ref, attr) is None), attr


def test_same_initialisation_as_pytorch():
    for kw in (dict(), dict(add_bias_kv=True), dict(kdim=5, vdim=7)):
        torch.manual_seed(3)
        ref = nn.MultiheadAttention(16, 2, **kw)
        torch.manual_seed(3)
        ours = fastattn.MultiHeadAttention(16, 2, **kw)
        for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), ours.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), n1


def test_dtype_and_device_arguments():
    m = fastattn.MultiHeadAttention(16, 2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    x = torch.randn(4, 2, 16, dtype=torch.float64)
    ref = nn.MultiheadAttention(16, 2, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    out, w = m(x, x, x)
    out_ref, w_ref = ref(x, x, x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mha_low_precision_2x_rule(dtype):
    from tolerances import assert_within_2x
    torch.manual_seed(0)
    ref32 = nn.MultiheadAttention(32, 4, batch_first=True)
    ref_lp = nn.MultiheadAttention(32, 4, batch_first=True).to(dtype)
    ours = fastattn.MultiHeadAttention(32, 4, batch_first=True).to(dtype)
    ref_lp.load_state_dict(ref32.state_dict())
    ours.load_state_dict(ref32.state_dict())
    x = torch.randn(2, 12, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(12)
    o32, w32 = ref32(x, x, x, attn_mask=mask)
    olp, wlp = ref_lp(x.to(dtype), x.to(dtype), x.to(dtype), attn_mask=mask.to(dtype))
    o, w = ours(x.to(dtype), x.to(dtype), x.to(dtype), attn_mask=mask.to(dtype))
    assert o.dtype == dtype and w.dtype == dtype
    assert_within_2x(o, o32, olp, name="output")
    assert_within_2x(w, w32, wlp, name="weights")
