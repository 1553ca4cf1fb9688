"""fastattn.MultiHeadAttention against torch.nn.MultiheadAttention: outputs, weights and the
gradients of inputs and of every parameter, for the constructor options and forward arguments
of the drop-in contract, on every backend available here.

The wide matrix runs on the fast backends (cpu, torch); the Triton interpreter gets a few
small cases of its own. Comparisons use dropout=0 (or eval) so results are deterministic.
"""

import itertools
import warnings

import pytest
import torch
import torch.nn as nn

import fastattn
from fastattn.nn import _masks

from conftest import TESTABLE_BACKENDS, backend_device
from tolerances import COMPOSED_FP32_TOL, FP32_TOL, MHA_WEIGHTS_FP32_TOL

FAST_BACKENDS = [b for b in TESTABLE_BACKENDS if b != "triton" and backend_device(b) == "cpu"]
E, H, KDIM, VDIM = 32, 4, 12, 20


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    with fastattn.use_backend(request.param):
        yield request.param


def make_pair(seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, **kw)
    ours = fastattn.MultiHeadAttention(E, H, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def make_inputs(n, q_len, k_len, *, batch_first, batched, cross, kdim=E, vdim=E, seed=1):
    g = torch.Generator().manual_seed(seed)

    def rand(s, feat):
        if not batched:
            shape = (s, feat)
        else:
            shape = (n, s, feat) if batch_first else (s, n, feat)
        return torch.randn(shape, generator=g).requires_grad_()

    q = rand(q_len, E)
    if not cross:
        return q, q, q
    k = rand(k_len, kdim)
    v = k if kdim == vdim and cross == "kv_same" else rand(k_len, vdim)
    return q, k, v


def run(module, q, k, v, seed=2, **fwd):
    """Forward + backward of a fixed random projection of out and weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # PyTorch's mixed-mask-type deprecation
        out, w = module(q, k, v, **fwd)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=g)).sum()
    leaves = [t for t in dict.fromkeys((q, k, v)) if t.requires_grad]
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    return out, w, grads


def assert_parity(ref, ours, q, k, v, **fwd):
    o_ref, w_ref, g_ref = run(ref, q, k, v, **fwd)
    with fastattn.record_dispatch() as calls:
        o, w, g = run(ours, q, k, v, **fwd)
    torch.testing.assert_close(o, o_ref, **COMPOSED_FP32_TOL, msg=lambda m: f"output: {m}")
    if w_ref is None:
        assert w is None
    else:
        torch.testing.assert_close(w, w_ref, **COMPOSED_FP32_TOL,
                                   msg=lambda m: f"weights: {m}")
    names = ["input"] * (len(g) - len(list(ours.parameters()))) + \
        [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        if b is None:
            assert a is None or not a.abs().any(), name
            continue
        torch.testing.assert_close(a, b, **COMPOSED_FP32_TOL,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    return calls


def fused_only(calls, backend, need_weights):
    """Every attention ran on the fused op of `backend`; weights from the lse kernel."""
    ops = [op for op, _ in calls]
    assert ops.count("attention") >= 1 and set(ops) <= {"attention", "attention_weights"}
    assert all(b == backend for op, b in calls if op == "attention"), calls
    if need_weights:
        assert "attention_weights" in ops
        if backend in ("cpu", "triton"):  # the backend's own weights kernel, not torch ops
            assert ("attention_weights", backend) in calls, calls
    else:
        assert "attention_weights" not in ops


# ------------------------------------------------------------------ masks used by the matrix

def causal_bool(q_len, k_len):
    return torch.ones(q_len, k_len, dtype=torch.bool).triu(1)


def masks(kind, n, q_len, k_len, seed=3):
    """(attn_mask, key_padding_mask, is_causal) of a named case; no query is fully masked."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None, None, False
    if kind == "causal_float_hint":
        return nn.Transformer.generate_square_subsequent_mask(q_len), None, True
    if kind == "causal_bool":
        return causal_bool(q_len, k_len), None, False
    if kind == "bool_2d":
        m = torch.rand(q_len, k_len, generator=g) < 0.3
        m[:, 0] = False
        return m, None, False
    if kind == "float_3d":
        return torch.randn(n * H, q_len, k_len, generator=g), None, False
    kpm = torch.zeros(n, k_len, dtype=torch.bool)
    kpm[n - 1, k_len - 3:] = True                       # right padding
    if kind == "kpm_right":
        return None, kpm, False
    if kind == "kpm_holes":
        kpm[0, 2] = kpm[-1, 1] = True
        return None, kpm, False
    if kind == "kpm_float":
        return None, torch.randn(n, k_len, generator=g), False
    if kind == "causal_hint_kpm":
        return nn.Transformer.generate_square_subsequent_mask(q_len), kpm, True
    if kind == "causal_bool_kpm_holes":
        kpm[0, 2] = True
        return causal_bool(q_len, k_len), kpm, False
    if kind == "bool_2d_kpm_holes":
        m = torch.rand(q_len, k_len, generator=g) < 0.3
        m[:, 0] = False
        kpm[-1, 4] = True
        return m, kpm, False
    if kind == "float_2d_kpm_bool":
        return torch.randn(q_len, k_len, generator=g), kpm, False
    raise AssertionError(kind)


SELF_MASKS = ["none", "causal_float_hint", "causal_bool", "bool_2d", "float_3d", "kpm_right",
              "kpm_holes", "kpm_float", "causal_hint_kpm", "causal_bool_kpm_holes",
              "bool_2d_kpm_holes", "float_2d_kpm_bool"]


# ------------------------------------------------------------------ the parity matrix

@pytest.mark.parametrize("mask_kind", SELF_MASKS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_self_attention_masks(fast_backend, mask_kind, batch_first, need_weights, average):
    n, length = 3, 9
    ref, ours = make_pair(batch_first=batch_first)
    q, k, v = make_inputs(n, length, length, batch_first=batch_first, batched=True, cross=False)
    attn_mask, kpm, is_causal = masks(mask_kind, n, length, length)
    calls = assert_parity(ref, ours, q, k, v, attn_mask=attn_mask, key_padding_mask=kpm,
                          is_causal=is_causal, need_weights=need_weights,
                          average_attn_weights=average)
    fused_only(calls, fast_backend, need_weights)


OPTIONS = [dict(bias=b, add_bias_kv=kv, add_zero_attn=z)
           for b, kv, z in itertools.product([True, False], repeat=3)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={int(v)}"
                                                                 for k, v in o.items()))
@pytest.mark.parametrize("cross", [False, "kv_same", "kdim"])
@pytest.mark.parametrize("mask_kind", ["none", "causal_bool_kpm_holes", "float_2d_kpm_bool",
                                       "kpm_right"])
def test_constructor_options(fast_backend, opts, cross, mask_kind):
    n, q_len = 2, 7
    k_len = q_len if not cross else 6
    if cross and mask_kind.startswith("causal"):
        k_len = q_len
    kw = dict(opts, batch_first=True)
    kdim = vdim = E
    if cross == "kdim":
        kw.update(kdim=KDIM, vdim=VDIM)
        kdim, vdim = KDIM, VDIM
    ref, ours = make_pair(**kw)
    q, k, v = make_inputs(n, q_len, k_len, batch_first=True, batched=True, cross=cross,
                          kdim=kdim, vdim=vdim)
    attn_mask, kpm, is_causal = masks(mask_kind, n, q_len, k_len)
    calls = assert_parity(ref, ours, q, k, v, attn_mask=attn_mask, key_padding_mask=kpm,
                          is_causal=is_causal, need_weights=True, average_attn_weights=False)
    fused_only(calls, fast_backend, True)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "causal_float_hint", "bool_2d", "float_3d",
                                       "kpm_float", "kpm_holes"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_unbatched(fast_backend, batch_first, mask_kind, need_weights):
    length = 8
    ref, ours = make_pair(batch_first=batch_first, add_bias_kv=True)
    q, k, v = make_inputs(1, length, length, batch_first=batch_first, batched=False,
                          cross=False)
    attn_mask, kpm, is_causal = masks(mask_kind, 1, length, length)
    if kpm is not None:
        kpm = kpm[0]
    calls = assert_parity(ref, ours, q, k, v, attn_mask=attn_mask, key_padding_mask=kpm,
                          is_causal=is_causal, need_weights=need_weights)
    fused_only(calls, fast_backend, need_weights)


def test_eval_mode_and_no_grad(fast_backend):
    ref, ours = make_pair(batch_first=True, dropout=0.3)
    ref.eval(), ours.eval()
    q, _, _ = make_inputs(2, 9, 9, batch_first=True, batched=True, cross=False)
    mask = nn.Transformer.generate_square_subsequent_mask(9)
    with torch.no_grad():
        o_ref, w_ref = ref(q, q, q, attn_mask=mask)
        o, w = ours(q, q, q, attn_mask=mask)
    torch.testing.assert_close(o, o_ref, **COMPOSED_FP32_TOL)
    torch.testing.assert_close(w, w_ref, **COMPOSED_FP32_TOL)


def test_float_attn_mask_gradient(fast_backend):
    """A float attn_mask that requires grad gets PyTorch's gradient (through both outputs)."""
    ref, ours = make_pair(batch_first=True)
    q, _, _ = make_inputs(2, 6, 6, batch_first=True, batched=True, cross=False)
    grads = []
    for module in (ref, ours):
        m = torch.randn(6, 6, generator=torch.Generator().manual_seed(5)).requires_grad_()
        out, w = module(q, q, q, attn_mask=m)
        (out.square().sum() + (w * torch.arange(6.0)).sum()).backward()
        grads.append(m.grad)
    torch.testing.assert_close(grads[1], grads[0], **COMPOSED_FP32_TOL)


# ------------------------------------------------------------------ Triton (interpreter): few

TRITON_CASES = [
    dict(mask_kind="causal_hint_kpm", batch_first=True, need_weights=True, opts={}),
    dict(mask_kind="float_2d_kpm_bool", batch_first=False, need_weights=True,
         opts=dict(add_bias_kv=True, add_zero_attn=True)),
    dict(mask_kind="kpm_right", batch_first=True, need_weights=False, opts=dict(bias=False)),
]


@pytest.mark.skipif("triton" not in TESTABLE_BACKENDS,
                    reason="needs the triton backend (TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c["mask_kind"])
def test_triton_backend(case):
    n, length = 2, 9
    ref, ours = make_pair(batch_first=case["batch_first"], **case["opts"])
    device = backend_device("triton")
    ref, ours = ref.to(device), ours.to(device)
    q, k, v = make_inputs(n, length, length, batch_first=case["batch_first"], batched=True,
                          cross=False)
    attn_mask, kpm, is_causal = masks(case["mask_kind"], n, length, length)
    with fastattn.use_backend("triton"):
        calls = assert_parity(ref, ours, q, k, v, attn_mask=attn_mask, key_padding_mask=kpm,
                              is_causal=is_causal, need_weights=case["need_weights"],
                              average_attn_weights=False)
    fused_only(calls, "triton", case["need_weights"])
    if case["need_weights"]:
        assert ("attention_weights", "triton") in calls


# ------------------------------------------------------------------ fully masked queries

@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_rows_are_zero(backend, need_weights):
    device = backend_device(backend)
    n, length = 2, 6
    ref, ours = make_pair(batch_first=True)
    with torch.no_grad():                                   # a bias that shows in the output
        ref.out_proj.bias.normal_()
        ours.out_proj.bias.copy_(ref.out_proj.bias)
    ref, ours = ref.to(device), ours.to(device)
    q, _, _ = make_inputs(n, length, length, batch_first=True, batched=True, cross=False)
    attn_mask = torch.zeros(length, length, dtype=torch.bool)
    attn_mask[2] = True                                     # query 2 sees nothing
    kpm = torch.zeros(n, length, dtype=torch.bool)
    kpm[1] = True                                           # batch 1 sees nothing at all
    with torch.no_grad():
        o_ref, w_ref = ref(q, q, q, attn_mask=attn_mask, key_padding_mask=kpm,
                           need_weights=need_weights)
        o, w = ours(q, q, q, attn_mask=attn_mask, key_padding_mask=kpm,
                    need_weights=need_weights)
    assert torch.isfinite(o).all()
    empty = torch.zeros(n, length, dtype=torch.bool)
    empty[:, 2] = True
    empty[1] = True
    # attention 0 -> output is out_proj applied to 0, i.e. its bias
    torch.testing.assert_close(o[empty], ours.out_proj.bias.expand(int(empty.sum()), E))
    torch.testing.assert_close(o[~empty], o_ref[~empty], **COMPOSED_FP32_TOL)
    if need_weights:
        assert torch.isnan(o_ref[empty]).all()              # PyTorch's NaN (documented)
        assert (w[empty] == 0).all()
        torch.testing.assert_close(w[~empty], w_ref[~empty], **COMPOSED_FP32_TOL)
    else:                                                   # PyTorch's SDPA path agrees
        torch.testing.assert_close(o[empty], o_ref[empty], **COMPOSED_FP32_TOL)
    # gradients stay finite
    x = q.detach().clone().requires_grad_()
    out, wt = ours(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm)
    (out.sum() + wt.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


# ------------------------------------------------------------------ dropout

# backends with dropout in their attention kernels (auto falls back from cpu to torch)
DROPOUT_BACKENDS = ["torch"] + (["triton"] if "triton" in TESTABLE_BACKENDS else [])


@pytest.mark.parametrize("name", DROPOUT_BACKENDS)
def test_dropout_weights_match_output(name):
    """With dropout in training, the returned per-head weights are the dropped probabilities
    the output was computed with (as in PyTorch): out == out_proj(weights @ v)."""
    torch.manual_seed(0)
    m = fastattn.MultiHeadAttention(E, H, dropout=0.4, batch_first=True)
    m.train()
    x = torch.randn(2, 11, E)
    with torch.no_grad(), fastattn.use_backend(name), fastattn.record_dispatch() as calls:
        out, w = m(x, x, x, average_attn_weights=False)
    assert ("attention", name) in calls
    with torch.no_grad():
        _, _, v = m._project(x, x, x, True)
        recon = (w @ v).transpose(1, 2).reshape(2, 11, E)
        expected = m.out_proj(recon)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    dropped = (w == 0).float().mean().item()
    assert 0.3 < dropped < 0.5, dropped                     # about p of the entries
    nonzero = w[w != 0]
    assert (nonzero >= 0).all() and torch.isfinite(nonzero).all()
    # eval: no dropout, rows sum to 1
    m.eval()
    with torch.no_grad():
        _, w_eval = m(x, x, x)
    torch.testing.assert_close(w_eval.sum(-1), torch.ones(2, 11))


def test_dropout_statistics_and_gradients():
    torch.manual_seed(0)
    m = fastattn.MultiHeadAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(2, 16, E, requires_grad=True)
    outs = [m(x, x, x, need_weights=False)[0] for _ in range(2)]
    assert not torch.allclose(outs[0], outs[1])            # fresh mask per call
    outs[0].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the expectation over masks is the no-dropout output
    with torch.no_grad():
        mean = torch.stack([m(x, x, x, need_weights=False)[0] for _ in range(200)]).mean(0)
        m.eval()
        clean = m(x, x, x, need_weights=False)[0]
    assert (mean - clean).abs().mean() < 0.1 * clean.abs().mean()


# ------------------------------------------------------------------ mask plumbing

def test_causal_and_padding_become_flags():
    n, length = 3, 10
    mask = nn.Transformer.generate_square_subsequent_mask(length)
    kpm = torch.zeros(n, length, dtype=torch.bool)
    kpm[0, 7:] = True
    common = dict(batch=n, heads=H, q_len=length, k_len=length, n_extra=0,
                  dtype=torch.float32, device=torch.device("cpu"), need_weights=True)
    m, kl, causal = _masks.prepare(mask, kpm, False, **common)
    assert m is None and causal and kl.tolist() == [7, 10, 10]
    kpm[1, 3] = True                                        # not right padding any more
    m, kl, causal = _masks.prepare(causal_bool(length, length), kpm, False, **common)
    assert causal and kl is None
    assert m.shape == (n, 1, 1, length) and m.dtype == torch.bool     # a view, not (N*H, L, S)
    assert torch.equal(m.view(n, length), ~kpm)
    m, kl, causal = _masks.prepare(mask, None, True, **common)
    assert m is None and kl is None and causal


def test_self_attention_uses_one_gemm(monkeypatch):
    calls = []
    original = torch.nn.functional.linear

    def counting(x, w, b=None):
        calls.append(tuple(w.shape))
        return original(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    m = fastattn.MultiHeadAttention(E, H, batch_first=True)
    x = torch.randn(2, 5, E)
    m(x, x, x, need_weights=False)
    assert calls[0] == (3 * E, E) and len(calls) == 2      # packed qkv, then out_proj


# ------------------------------------------------------------------ errors

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="embed_dim"):
        fastattn.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.MultiHeadAttention(8, 0)
    with pytest.raises(ValueError, match="dropout"):
        fastattn.MultiHeadAttention(8, 2, dropout=1.5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        fastattn.MultiHeadAttention(8, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="window"):
        fastattn.MultiHeadAttention(8, 2, window="wide")


def test_bad_forward_arguments():
    m = fastattn.MultiHeadAttention(E, H, batch_first=True)
    x = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(2, 5, E + 1), x, x)
    with pytest.raises(ValueError, match="key"):
        m(x, torch.randn(2, 5, E + 2), x)
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(5, E).unsqueeze(0).unsqueeze(0), x, x)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(2, 5, 5))                  # needs (N*H, L, S)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="attn_mask"):
        m(x, x, x, is_causal=True)


# ------------------------------------------------------------------ the attention_weights op

from fastattn import reference  # noqa: E402
from fastattn.ops.attention_weights import attention_weights, attention_weights_op  # noqa: E402

WEIGHT_CASES = [
    dict(),
    dict(causal=True),
    dict(causal=True, alignment="bottom_right"),
    dict(window_left=3, window_right=1),
    dict(softcap=4.0, causal=True),
    dict(mask="bool"),
    dict(mask="float", key_lengths=True),
    dict(key_lengths=True, causal=True),
]


def _weights_case(case, device, b=2, h=4, hkv=2, sq=11, sk=13, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, sq, d, generator=g).to(device, dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(device, dtype)
    kw = {key: val for key, val in case.items() if key not in ("mask", "key_lengths")}
    if case.get("mask") == "bool":
        m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        m[1, 0, 2] = False                                  # one fully masked query row
        kw["mask"] = m.to(device).expand(b, h, sq, sk)
    elif case.get("mask") == "float":
        kw["mask"] = torch.randn(b, h, sq, sk, generator=g).to(device, dtype)
    if case.get("key_lengths"):
        kw["key_lengths"] = torch.tensor([sk, 4], device=device)
    return q, k, kw


def _weights_label(backend):
    return backend if backend in ("triton", "cpu") else "torch"


@pytest.mark.parametrize("average", [False, True], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=lambda c: "-".join(map(str, c.values()))
                         or "plain")
def test_attention_weights_op(backend, case, average):
    device = backend_device(backend)
    q, k, kw = _weights_case(case, device)
    q.requires_grad_(), k.requires_grad_()
    if "mask" in kw and kw["mask"].is_floating_point():
        kw["mask"] = kw["mask"].detach().requires_grad_()
    ref_kw = dict(kw)
    _, lse = reference.attention(q.detach(), k.detach(), k.detach(), scale=0.3,
                                 return_lse=True, **{key: (val.detach() if torch.is_tensor(val)
                                                           else val)
                                                     for key, val in ref_kw.items()})
    with fastattn.record_dispatch() as calls:
        p = attention_weights(q, k, lse, scale=0.3, average=average, **kw)
    assert calls == [("attention_weights", _weights_label(backend))]
    p_ref = reference.attention_weights(q, k, scale=0.3, **ref_kw)
    if average:
        p_ref = p_ref.mean(dim=1)
    torch.testing.assert_close(p, p_ref, **FP32_TOL)
    assert torch.isfinite(p).all()
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(device)
    leaves = [q, k] + ([kw["mask"]] if "mask" in kw and kw["mask"].requires_grad else [])
    grads = torch.autograd.grad((p * g).sum(), leaves)
    grads_ref = torch.autograd.grad((p_ref * g).sum(), leaves)
    for name, a, b in zip(["q", "k", "mask"], grads, grads_ref):
        torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("op_backend", ["torch", "cpu"])
def test_attention_weights_empty_rows_and_opcheck(op_backend):
    from fastattn import _C_ops
    if op_backend == "cpu" and _C_ops.unsupported("attention_weights") is not None:
        pytest.fail("fastattn._C is built by make test; its weights kernel must be there")
    q, k, kw = _weights_case(dict(mask="bool", key_lengths=True), "cpu")
    _, lse = reference.attention(q, k, k, scale=0.25, return_lse=True, **kw)
    assert torch.isneginf(lse).any()
    p = attention_weights(q, k, lse, scale=0.25, backend=op_backend, **kw)
    assert (p[torch.isneginf(lse)] == 0).all()
    for average in (False, True):
        args = (q.requires_grad_(), k.requires_grad_(), lse, kw["mask"], kw["key_lengths"],
                0.25, True, False, -1, -1, 0.0, average, op_backend)
        torch.library.opcheck(attention_weights_op, args)


def test_attention_weights_cpu_kernel_long_keys_and_bad_lse():
    """Sk past one 512-key tile, causal bottom-right, GQA; and a wrong lse names itself."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 70, 32, generator=g)
    k = torch.randn(2, 2, 1100, 32, generator=g)
    kw = dict(causal=True, alignment="bottom_right", window_left=700)
    _, lse = reference.attention(q, k, k, scale=0.2, return_lse=True, **kw)
    ref = reference.attention_weights(q, k, scale=0.2, **kw)
    for average in (False, True):
        p = attention_weights(q, k, lse, scale=0.2, average=average, backend="cpu", **kw)
        torch.testing.assert_close(p, ref.mean(1) if average else ref, **MHA_WEIGHTS_FP32_TOL)
    with pytest.raises(RuntimeError, match="lse must be"):
        attention_weights(q, k, lse[:, :2], scale=0.2, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_weights_low_precision(backend, dtype):
    from tolerances import assert_within_2x
    device = backend_device(backend)
    q, k, kw = _weights_case(dict(causal=True), device, dtype=dtype)
    q32, k32 = q.float(), k.float()
    _, lse32 = reference.attention(q32, k32, k32, scale=0.25, return_lse=True, **kw)
    _, lse_lp = reference.attention(q, k, k, scale=0.25, return_lse=True, **kw)
    p = attention_weights(q, k, lse_lp, scale=0.25, **kw)
    assert p.dtype == dtype
    ref = reference.attention_weights(q32, k32, scale=0.25, **kw)
    pt = reference.attention_weights(q, k, scale=0.25, **kw)
    assert_within_2x(p, ref, pt, name="weights")
    mean = attention_weights(q, k, lse_lp, scale=0.25, average=True, **kw)
    assert mean.dtype == dtype
    assert_within_2x(mean, ref.mean(1), pt.mean(1), name="head-mean weights")
