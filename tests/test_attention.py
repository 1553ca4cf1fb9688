"""fastattn.scaled_dot_product_attention on every backend against the reference.

Output and dq, dk, dv (and the float mask's gradient): fp32 tight, fp16/bf16 by the 2x rule.
Launcher-level and kernel-specific cases live in test_attention_triton.py / test_attention_cpu.py.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_device
from tolerances import FP32_TOL, GRADCHECK_ATOL, assert_within_2x

import fastattn
from fastattn import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_qkv(b, h, hkv, sq, sk, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def ref_kwargs(kw):
    """Public-API keywords -> reference.attention keywords."""
    out = {}
    if kw.get("is_causal"):
        out["causal"] = True
    if "causal_alignment" in kw:
        out["alignment"] = kw["causal_alignment"]
    if "window" in kw:
        out["window_left"], out["window_right"] = kw["window"]
    for name in ("scale", "softcap", "key_lengths"):
        if name in kw:
            out[name] = kw[name]
    return out


def check_attention(q, k, v, *, mask=None, grads=True, **kw):
    """Run fastattn and the fp32 / low-precision references; compare output and gradients."""
    gqa = q.shape[1] != k.shape[1]
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    mask_leaf = None
    if mask is not None and mask.is_floating_point() and grads:
        mask_leaf = mask.detach().clone().requires_grad_(True)
    m = mask_leaf if mask_leaf is not None else mask
    out = fastattn.scaled_dot_product_attention(*leaves, attn_mask=m, enable_gqa=gqa, **kw)

    def run_ref(dtype):
        ts = [t.detach().to(dtype).requires_grad_(grads) for t in (q, k, v)]
        mm = mask
        if mask_leaf is not None:
            mm = mask.detach().to(dtype).requires_grad_(True)
        elif mask is not None and mask.is_floating_point():
            mm = mask.to(dtype)
        r = reference.attention(*ts, mask=mm, **ref_kwargs(kw))
        return r, ts + ([mm] if mask_leaf is not None else [])

    ref, ref_inputs = run_ref(torch.float32)
    pt, pt_inputs = run_ref(q.dtype)
    assert_within_2x(out, ref.to(out.dtype) if out.dtype == torch.float32 else ref, pt,
                    name="out")
    if not grads:
        return out
    dout = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves + ([mask_leaf] if mask_leaf is not None else []),
                               dout)
    theirs = torch.autograd.grad(ref, ref_inputs, dout.float())
    lowp = torch.autograd.grad(pt, pt_inputs, dout)
    for name, a, r, p in zip(("dq", "dk", "dv", "dmask"), ours, theirs, lowp):
        assert_within_2x(a, r, p, name=name)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,d", [(1, 1, 16), (7, 97, 40), (97, 7, 64), (129, 129, 80)])
def test_shapes_and_dtypes(backend, dtype, sq, sk, d):
    q, k, v = make_qkv(1, 2, 2, sq, sk, d, dtype, backend_device(backend))
    check_attention(q, k, v)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("sq,sk", [(33, 33), (17, 45), (45, 17)])
def test_causal_both_alignments(backend, alignment, sq, sk):
    q, k, v = make_qkv(2, 2, 2, sq, sk, 32, torch.float32, backend_device(backend))
    check_attention(q, k, v, is_causal=True, causal_alignment=alignment)


def test_gqa_and_mqa(backend):
    dev = backend_device(backend)
    for hkv in (2, 1):
        q, k, v = make_qkv(2, 4, hkv, 19, 23, 32, torch.float16, dev)
        check_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("mask_kind", ["bool_full", "bool_broadcast", "float_full",
                                        "float_broadcast"])
def test_masks(backend, mask_kind):
    dev = backend_device(backend)
    q, k, v = make_qkv(2, 2, 2, 21, 37, 32, torch.float32, dev)
    g = torch.Generator().manual_seed(1)
    shape = (2, 2, 21, 37) if mask_kind.endswith("full") else (21, 37)
    if mask_kind.startswith("bool"):
        mask = (torch.rand(shape, generator=g) > 0.3).to(dev)
    else:
        mask = torch.randn(shape, generator=g).to(dev)
    check_attention(q, k, v, mask=mask)


def test_mask_and_causal_together(backend):
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, torch.float32, backend_device(backend))
    mask = torch.randn(20, 20, generator=torch.Generator().manual_seed(2)).to(q.device)
    out = check_attention(q, k, v, mask=mask, is_causal=True)
    causal = torch.ones(20, 20, dtype=torch.bool, device=q.device).tril()
    expected = reference.attention(q, k, v, mask=mask.masked_fill(~causal, float("-inf")))
    torch.testing.assert_close(out.detach(), expected, **FP32_TOL)


def test_window_softcap_key_lengths(backend):
    dev = backend_device(backend)
    q, k, v = make_qkv(2, 2, 2, 40, 40, 32, torch.float32, dev)
    check_attention(q, k, v, window=(5, 3))
    check_attention(q, k, v, is_causal=True, window=(8, 0), causal_alignment="bottom_right")
    check_attention(q, k, v, key_lengths=torch.tensor([40, 13], device=dev))
    if fastattn._backend.backend_module(backend, "attention").unsupported(
            "attention", device=dev, dtype=torch.float32, head_dim=32, v_head_dim=32, q_len=40,
            k_len=40, mask=None, mask_needs_grad=False, causal=False, alignment="top_left",
            window=False, softcap=20.0, key_lengths=False, dropout_p=0.0, gqa=False,
            deterministic=False) is None:
        check_attention(q, k, v, softcap=20.0)


def test_fully_masked_rows_give_zero_and_zero_grads(backend):
    dev = backend_device(backend)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 6, 8, 16, torch.float32, dev))
    mask = torch.ones(6, 8, dtype=torch.bool, device=dev)
    mask[2] = False
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all() and torch.all(out[:, :, 2] == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 2] == 0)
    # key_lengths = 0 masks a whole batch row: all zeros, no NaN.
    out0, lse = fastattn.scaled_dot_product_attention(
        q.detach(), k.detach(), v.detach(), key_lengths=torch.tensor([0], device=dev),
        return_lse=True)
    assert torch.all(out0 == 0) and torch.isneginf(lse).all()


def test_return_lse_and_unbatched(backend):
    dev = backend_device(backend)
    q, k, v = make_qkv(1, 3, 3, 9, 11, 16, torch.float32, dev)
    out, lse = fastattn.scaled_dot_product_attention(q[0], k[0], v[0], return_lse=True)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, ref[0], **FP32_TOL)
    torch.testing.assert_close(lse, ref_lse[0], **FP32_TOL)


def test_non_contiguous_inputs(backend):
    dev = backend_device(backend)
    base = torch.randn(2, 13, 3, 2, 32, device=dev)            # (B, S, 3, H, D) packed qkv
    q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) strided views
    check_attention(q, k, v, is_causal=True)


def test_matches_torch_sdpa_signature(backend):
    dev = backend_device(backend)
    q, k, v = make_qkv(2, 2, 2, 10, 10, 16, torch.float32, dev)
    ours = fastattn.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.5)
    theirs = F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.5)
    torch.testing.assert_close(ours, theirs, **FP32_TOL)
    for fn in (fastattn.scaled_dot_product_attention, F.scaled_dot_product_attention):
        with pytest.raises(TypeError):
            fn(q, k, v, None, 0.0, True, 0.5)            # scale is keyword-only in both


def test_dropout_keep_fraction_and_consistent_backward():
    # Dropout is implemented by the triton and torch backends; auto on CPU falls back to torch.
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 64, 64, 16, torch.float32, "cpu"))
    torch.manual_seed(5)
    out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(5)
    again = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    torch.testing.assert_close(out, again)            # same seed, same mask
    plain = fastattn.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(out, plain)
    # With v = identity rows, out = P_drop; the kept fraction of nonzero P entries ~ 0.75.
    eye = torch.eye(64).expand(1, 2, 64, 64)
    torch.manual_seed(6)
    p_drop = fastattn.scaled_dot_product_attention(q.detach(), k.detach(), eye, dropout_p=0.25)
    kept = (p_drop != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.03, kept
    # Backward consistent with the forward's mask: gradient check on the dropped output.
    # (float64 runs on the torch backend; small so gradcheck's many calls stay cheap)
    q64, k64, v64 = (t.detach()[:, :1, :5, :8].double().requires_grad_() for t in (q, k, v))

    def f(a, b, c):
        torch.manual_seed(7)
        return fastattn.scaled_dot_product_attention(a, b, c, dropout_p=0.3)
    assert torch.autograd.gradcheck(f, (q64, k64, v64), atol=GRADCHECK_ATOL)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q, k[..., :8], v), "head dim"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), "enable_gqa"),
    (lambda q, k, v: (q.int(), k, v), "query"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "value"),
])
def test_bad_input_names_the_argument(bad, match):
    q, k, v = make_qkv(1, 4, 4, 6, 6, 16, torch.float32, "cpu")
    with pytest.raises((ValueError, RuntimeError), match=match):
        fastattn.scaled_dot_product_attention(*bad(q, k, v))


def test_bad_mask_and_gqa():
    q, k, v = make_qkv(1, 4, 3, 6, 6, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple"):
        fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    q, k, v = make_qkv(1, 4, 4, 6, 6, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="attn_mask"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(6, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="window"):
        fastattn.scaled_dot_product_attention(q, k, v, window=(1, 2, 3))
    with pytest.raises(ValueError, match="key_lengths"):
        fastattn.scaled_dot_product_attention(q, k, v, key_lengths=torch.tensor([1, 2]))


def test_opcheck_custom_ops():
    q, k, v = make_qkv(1, 2, 2, 5, 7, 16, torch.float32, "cpu")
    args = (q, k, v, None, None, None, 0.25, True, False, -1, -1, 0.0, 0.0, False, "torch")
    torch.library.opcheck(torch.ops.fastattn.attention.default, args)
