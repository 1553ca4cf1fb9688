"""The reproductions of issue #12 (attention parts), each a named test on every backend that
runs it. Crash reproductions run in a fresh subprocess, so a segfault or heap corruption
fails the test instead of killing pytest.

Checked against a float64 softmax written here (tests/test_fuzz_attention.py's oracle).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from conftest import TESTABLE_BACKENDS, backend_device
from tolerances import (ATTENTION_FP32, EPS, assert_max_err, bound_2x, floor_for,
                        max_relative_bound)
from test_fuzz_attention import oracle

HERE = os.path.dirname(os.path.abspath(__file__))
# The child imports the fastattn this process imported (e.g. scripts/asan.sh's sanitized copy).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))


def _run_isolated(code, backend, runs=1):
    """Run `code` in `runs` fresh interpreters on `backend`; each must exit 0 and print OK."""
    src = f"import fastattn, torch\nwith fastattn.use_backend({backend!r}):\n" + "".join(
        "    " + line + "\n" for line in code.strip().splitlines()) + "print('OK')\n"
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                           timeout=600, cwd=HERE,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE])))
        assert r.returncode == 0 and "OK" in r.stdout, (
            f"exit {r.returncode} (negative = killed by that signal)\n{r.stdout[-2000:]}"
            f"\n{r.stderr[-3000:]}")


def _check_against_oracle(backend, q, k, v, *, mask=None, window=None, is_causal=False,
                          softcap=0.0, enable_gqa=False, scale=None):
    """Output and gradients finite and within the 2x rule / fp32 bounds of the fp64 oracle."""
    device = backend_device(backend)
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    mask = None if mask is None else mask.to(device)
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, window=window,
                                                    is_causal=is_causal, softcap=softcap,
                                                    enable_gqa=enable_gqa, scale=scale)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    wl, wr = (window, window) if isinstance(window, int) else (window or (-1, -1))
    kw = dict(mask=mask, scale=1 / math.sqrt(q.shape[-1]) if scale is None else scale,
              causal=is_causal, bottom_right=False, wl=wl, wr=wr, softcap=softcap,
              key_lengths=None, keep=None, dropout_p=0.0)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _, _ = oracle(*l64, fp64=True, **kw)
    ref_g = torch.autograd.grad(ref, l64, dout.double())
    lp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    pt, _, _ = oracle(*lp, fp64=False, **kw)
    pt_g = torch.autograd.grad(pt, lp, dout)
    for name, got, r, p in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_g),
                               (pt, *pt_g)):
        assert torch.isfinite(got).all(), f"{name}: NaN/inf"
        if got.dtype == torch.float32:
            bound = max_relative_bound(r, **ATTENTION_FP32)
        elif not torch.isfinite(p).all():
            # the dtype-precision oracle itself overflows (fp16 gradients at scale 1e10): two
            # ulps of the dtype relative to max|ref| instead (the attention fuzz's rule)
            bound = max_relative_bound(r, floor_for(got.dtype), 2 * EPS[got.dtype])
        else:
            bound = bound_2x(p, r, floor_for(got.dtype))
        assert_max_err(got, r, bound, name)
    return out, grads


# ------------------------------------------------------------------ item 1: windows past Sk

@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
def test_issue12_window_past_last_key_does_not_crash(backend):
    # q (1,1,529,64), k/v (1,1,23,64), window=(3,-1): rows 27.. see no key. Crashed 3 of 6
    # fresh processes on the cpu backend and gave NaN in the others.
    code = """
torch.manual_seed(0)
q = torch.randn(1, 1, 529, 64, requires_grad=True)
k = torch.randn(1, 1, 23, 64, requires_grad=True)
v = torch.randn(1, 1, 23, 64, requires_grad=True)
out = fastattn.scaled_dot_product_attention(q, k, v, window=(3, -1))
out.sum().backward()
for t in (out, q.grad, k.grad, v.grad):
    assert torch.isfinite(t).all()
assert (out[0, 0, 27:] == 0).all() and (q.grad[0, 0, 27:] == 0).all()
"""
    if backend == "triton" and backend_device(backend) == "cpu":
        code = code.replace("529", "70")        # the interpreter is slow; same row pattern
    _run_isolated(code, backend, runs=3 if backend == "cpu" else 1)


@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
@pytest.mark.parametrize("case", ["fp32_w1", "gqa_causal_softcap", "fp16_bool_mask"])
def test_issue12_window_past_last_key_matches_oracle(backend, case):
    g = torch.Generator().manual_seed(12)
    small = backend == "triton" and backend_device(backend) == "cpu"
    if case == "fp32_w1":       # q (2,4,458,160) k/v (2,4,7,160) fp32 window=(1,-1)
        sq = 70 if small else 458
        q, k, v = (torch.randn(2, 4, s, 160, generator=g) for s in (sq, 7, 7))
        _check_against_oracle(backend, q, k, v, window=(1, -1))
    elif case == "gqa_causal_softcap":   # (1,2,540,80) vs (1,1,1,80), causal, window 0, softcap 50
        sq = 70 if small else 540
        q = torch.randn(1, 2, sq, 80, generator=g)
        k, v = torch.randn(1, 1, 1, 80, generator=g), torch.randn(1, 1, 1, 80, generator=g)
        _check_against_oracle(backend, q, k, v, is_causal=True, window=0, softcap=50.0,
                              enable_gqa=True)
    else:                       # fp16 (1,8,216,80) vs (1,8,23,80), bool mask (1,1,1,Sk), window 0
        sq = 70 if small else 216
        q = torch.randn(1, 8, sq, 80, generator=g).half()
        k, v = (torch.randn(1, 8, 23, 80, generator=g).half() for _ in range(2))
        mask = torch.rand(1, 1, 1, 23, generator=g) > 0.3
        _check_against_oracle(backend, q, k, v, mask=mask, window=0)


# ------------------------------------------------------------------ item 2: MHA weights crash

@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
def test_issue12_mha_weights_window_no_heap_corruption(backend):
    # MultiHeadAttention(8, 1, window=(0,-1)), query (2,10,8), key/value (2,8,8),
    # need_weights=True, average_attn_weights=False: SIGSEGV / "corrupted size vs. prev_size".
    code = """
from tolerances import TIGHT_FP32_TOL   # tests/ is on the child's PYTHONPATH
torch.manual_seed(0)
mha = fastattn.MultiHeadAttention(8, 1, batch_first=True, window=(0, -1))
query, key = torch.randn(2, 10, 8), torch.randn(2, 8, 8)
for average in (False, True):
    out, w = mha(query, key, key, need_weights=True, average_attn_weights=average)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    w4 = w if not average else w.unsqueeze(1)
    assert (w4[:, :, 8:] == 0).all()                       # rows 8, 9: no key in the window
    sums = w4[:, :, :8].sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), **TIGHT_FP32_TOL)
"""
    _run_isolated(code, backend, runs=3 if backend == "cpu" else 1)


# ------------------------------------------------------------------ item 3: MHA NaN

@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
def test_issue12_mha_bf16_window_masks_no_nan(backend):
    # E=72, H=3, bf16, window=(7,0), N=2, L=49, S=1, key is value, float key_padding_mask and
    # a 2-D bool attn_mask: output and every gradient were NaN.
    device = backend_device(backend)
    torch.manual_seed(3)
    mha = fastattn.MultiHeadAttention(72, 3, batch_first=True, window=(7, 0))
    mha = mha.to(device=device, dtype=torch.bfloat16)
    query = torch.randn(2, 49, 72, device=device, dtype=torch.bfloat16, requires_grad=True)
    key = torch.randn(2, 1, 72, device=device, dtype=torch.bfloat16, requires_grad=True)
    kpm = torch.zeros(2, 1, device=device, dtype=torch.bfloat16)
    attn_mask = torch.zeros(49, 1, dtype=torch.bool, device=device)
    attn_mask[3] = True                       # one query hides its only key
    with fastattn.use_backend(backend):
        out, _ = mha(query, key, key, key_padding_mask=kpm, attn_mask=attn_mask,
                     need_weights=False)
    out.float().square().sum().backward()
    for name, t in (("out", out), ("dquery", query.grad), ("dkey", key.grad),
                    ("din_proj", mha.in_proj_weight.grad)):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
    # window (7, 0), top-left: query i sees key 0 only for i <= 7; the others (and query 3,
    # masked) attend to nothing, so their output is out_proj's bias.
    bias = mha.out_proj.bias.detach()
    assert torch.equal(out[:, 8:].detach(), bias.expand(2, 41, 72))
    assert torch.equal(out[:, 3].detach(), bias.expand(2, 72))
    assert not torch.equal(out[:, 0].detach(), bias.expand(2, 72))


# ------------------------------------------------------------------ item 5: deterministic

@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
def test_issue12_deterministic_is_bitwise_reproducible(backend):
    # q (1,1,207,192), k/v (1,1,149,192) bf16, float mask (H,Sq,Sk) with -inf, non-contiguous,
    # window=(31,1), softcap=5, grads of q, k, v: two runs differed.
    device = backend_device(backend)
    small = backend == "triton" and device == "cpu"
    sq, sk, d = (40, 29, 48) if small else (207, 149, 192)
    g = torch.Generator().manual_seed(5)
    # non-contiguous: rows of d + 8 elements, of which the first d are used
    q, k, v = (torch.randn(1, 1, s, d + 8, generator=g).to(device, torch.bfloat16)[..., :d]
               for s in (sq, sk, sk))
    mask = torch.randn(1, sk, sq, generator=g).masked_fill(
        torch.rand(1, sk, sq, generator=g) < 0.2, float("-inf")).to(device, torch.bfloat16)
    mask = mask.transpose(1, 2)                                    # (H, Sq, Sk), non-contiguous
    assert not q.is_contiguous() and not mask.is_contiguous()
    dout = torch.randn(1, 1, sq, d, generator=g).to(device, torch.bfloat16)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with fastattn.use_backend(backend):
            out = fastattn.scaled_dot_product_attention(*leaves, attn_mask=mask,
                                                        window=(31, 1), softcap=5.0,
                                                        deterministic=True)
        return (out, *torch.autograd.grad(out, leaves, dout))

    first, second = run(), run()
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.isfinite(a).all(), f"{name}: NaN/inf"
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


# ------------------------------------------------------------------ item 10: small defects

@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_issue12_huge_scale_is_finite_and_one_hot(backend, dtype):
    # scale=1e10 gave inf on the cpu kernels; PyTorch gives the one-hot answer.
    device = backend_device(backend)
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 3, s, 64, generator=g).to(device, dtype) for s in (37, 41, 41))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(*leaves, scale=1e10)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    s = q.double() @ k.double().transpose(-1, -2)
    pick = s.argmax(-1, keepdim=True).expand(-1, -1, -1, 64)
    expected = torch.gather(v.double(), 2, pick)
    assert torch.equal(out.double(), expected), "not the one-hot attention output"
    for name, t in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(t).all(), f"{name}: NaN/inf"


@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,sq,sk", [(2, 37, 45), (1, 5, 512)], ids=["dense", "decode_path"])
def test_issue12_huge_scale_gradients_match_the_oracle(backend, dtype, b, sq, sk):
    # scale=1e10 (logits ~1e11): every row is one-hot, so dv_j is the sum of the dO rows whose
    # max is key j and dq = dk = 0 (dP_ij = dO_i . V_j = dO_i . O_i = delta_i at the max key).
    # The triton backward recomputed P from lse after a natural-log round trip (off by ~1e4 in
    # the exponent: P 0 or 1 at random, dv off by ~3) and summed delta in another order than
    # dP (dS = the difference, times scale: dq, dk ~1e4, inf in fp16). Sq <= 16 with Sk >= 512
    # takes the triton split-K decode forward, whose lse the backward then reads.
    g = torch.Generator().manual_seed(12)
    q = torch.randn(b, 4, sq, 40, generator=g).to(dtype)
    k, v = (torch.randn(b, 2, sk, 40, generator=g).to(dtype) for _ in range(2))
    _check_against_oracle(backend, q, k, v, enable_gqa=True, scale=1e10)


@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
def test_issue12_head_dim_zero_returns_empty(backend):
    device = backend_device(backend)
    q = torch.randn(2, 3, 5, 0, device=device, requires_grad=True)
    k = torch.randn(2, 3, 4, 0, device=device, requires_grad=True)
    v = torch.randn(2, 3, 4, 0, device=device, requires_grad=True)
    with fastattn.use_backend(backend):
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True,
                                                         is_causal=True)
    assert out.shape == (2, 3, 5, 0)
    # all scores are 0: lse = log(number of visible keys) = log(min(i + 1, Sk)) (causal)
    visible = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0], device=device)
    assert torch.allclose(lse, torch.log(visible).expand(2, 3, 5))
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
@pytest.mark.parametrize("lengths", [[5, -1], [5, 6], [100, 0]])
def test_issue12_key_lengths_out_of_range_raise(backend, lengths):
    device = backend_device(backend)
    q, k, v = (torch.randn(2, 1, 4, 16, device=device) for _ in range(3))
    k, v = k[:, :, :5], v[:, :, :5]
    with fastattn.use_backend(backend), pytest.raises(ValueError, match="key_lengths"):
        fastattn.scaled_dot_product_attention(q, k, v, key_lengths=torch.tensor(lengths))


@pytest.mark.parametrize("backend", TESTABLE_BACKENDS)
@pytest.mark.parametrize("kwargs,name", [
    (dict(window=(-2, 0)), "window"), (dict(window=-5), "window"),
    (dict(window=(True, 0)), "window"),
    (dict(softcap=float("nan")), "softcap"), (dict(softcap=float("inf")), "softcap"),
    (dict(softcap=-1.0), "softcap"), (dict(scale=float("nan")), "scale"),
    (dict(scale=float("inf")), "scale"), (dict(dropout_p=float("nan")), "dropout_p"),
])
def test_issue12_bad_arguments_rejected_on_every_backend(backend, kwargs, name):
    device = backend_device(backend)
    q, k, v = (torch.randn(1, 2, 4, 16, device=device) for _ in range(3))
    with fastattn.use_backend(backend), pytest.raises(ValueError, match=name):
        fastattn.scaled_dot_product_attention(q, k, v, **kwargs)


def test_issue12_mha_rejects_negative_window():
    with pytest.raises(ValueError, match="window"):
        fastattn.MultiHeadAttention(8, 2, window=(-3, 0))


def test_issue12_integer_dtype_error_does_not_call_int_floating():
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))
    with pytest.raises(ValueError, match="key_lengths") as exc:
        fastattn.scaled_dot_product_attention(q, k, v, key_lengths=torch.tensor([2.0]))
    assert "floating" not in str(exc.value) and "int32" in str(exc.value)
    with pytest.raises(ValueError, match="query must have a floating dtype"):
        fastattn.scaled_dot_product_attention(q.int(), k, v)


def test_issue12_cpu_entry_points_check_key_lengths_range():
    # The C++ ops check what they index even when called directly (no Python validation).
    import fastattn._C  # noqa: F401  (make test always builds it: a missing build fails here)
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))
    args = (None, 0.25, False, False, -1, -1, 0.0)
    for bad in ([9], [-1]):
        with pytest.raises(RuntimeError, match="key_lengths"):
            torch.ops.fastattn_kernels.attention_forward(q, k, v, *args, torch.tensor(bad), 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="softcap"):
        torch.ops.fastattn_kernels.attention_forward(q, k, v, None, 0.25, False, False, -1, -1,
                                             float("nan"), None, 0.0, 0, 0)
    lse = torch.zeros(1, 1, 4)
    with pytest.raises(RuntimeError, match="key_lengths"):
        torch.ops.fastattn_kernels.attention_weights_forward(q, k, lse, None, 0.25, False, False, -1,
                                                     -1, 0.0, torch.tensor([5]), False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_issue12_torch_backend_low_precision_gradients_meet_2x_rule(dtype):
    # The torch backend (what `auto` falls back to) missed the 2x rule in some configs: its
    # forward ran in the input dtype while its backward used fp32. Both run in fp32 now.
    g = torch.Generator().manual_seed(150)
    for trial in range(6):
        sq, sk, d = (33, 97, 40) if trial % 2 else (129, 7, 80)
        q, k, v = (torch.randn(2, 2, s, d, generator=g).to(dtype) for s in (sq, sk, sk))
        mask = (torch.randn(1, 2, sq, sk, generator=g) * 2).to(dtype)
        _check_against_oracle("torch", q, k, v, mask=mask, window=(trial * 5, 3),
                              softcap=20.0 if trial > 2 else 0.0)
