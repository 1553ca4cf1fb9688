"""torch.compile sees the Triton kernels: on the triton backend, the row-wise ops, attention
(dense, split-K decode, packed varlen and KV-cache) and the attention-state merge trace into their
fastattn_triton twins (torch.library.triton_op), so the AOTAutograd graphs hold
triton_kernel_wrapper nodes instead of an opaque fastattn op, forward and backward; results and
gradients equal the eager calls (the same kernels on the same inputs, dropout included).
kvcache_attention's twin appends to its caches in place, as the fastattn op does (mutates_args).
Other backends keep the opaque fastattn op.

On CPU tensors (TRITON_INTERPRET=1) the graphs run with AOTAutograd's eager executor: inductor
cannot compile user-defined Triton kernels for CPU tensors ("triton not built with the 'cpu'
backend"); on a GPU the same tests run on CUDA tensors, plus one inductor test.
"""

import numpy as np
import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import fastattn
from fastattn.kernels._compat import interpreting
from fastattn.ops import _triton
from fastattn.ops.attention_weights import attention_weights
from tolerances import COMPOSED_FP32_GRAD_TOL, COMPOSED_FP32_TOL

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if interpreting() else "cuda"
KERNEL_NODE = "triton_kernel_wrapper_functional"
OPAQUE = "torch.ops.fastattn."          # the generic ops (fastattn_triton.* does not match)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphCapture:
    """An AOTAutograd backend that keeps the code of its forward and backward graphs and runs
    them as they are (aot_eager)."""

    def __init__(self):
        self.forward, self.backward = [], []
        self.backend = aot_autograd(fw_compiler=self._keep(self.forward),
                                    bw_compiler=self._keep(self.backward))

    @staticmethod
    def _keep(codes):
        def compiler(gm, example_inputs):
            codes.append(gm.code)
            return make_boxed_func(gm.forward)
        return compiler


def run(fn, inputs, compile_backend=None):
    """(outputs, gradients of the leaves that require grad), eager or compiled."""
    xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    # dynamic=False: shapes are constants of fastattn's trace-time backend choice
    f = fn if compile_backend is None else torch.compile(fn, fullgraph=True, dynamic=False,
                                                         backend=compile_backend)
    out = f(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape))
               .sum() for o in outs)
    leaves = [t for t in xs if t.requires_grad]
    return outs, torch.autograd.grad(loss, leaves)


def randn(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)


COS, SIN = (t.to(DEVICE) for t in fastattn.rotary_cache(12, 6))


def _weights_case():
    """q, k and the lse of their attention (a constant of the compiled function)."""
    q, k, v = randn(1, 4, 6, 16), randn(1, 2, 6, 16, seed=1), randn(1, 2, 6, 16, seed=2)
    with torch.no_grad(), fastattn.use_backend("torch"):
        _, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                       return_lse=True)
    weights = lambda q, k: attention_weights(q, k, lse, scale=0.25, causal=True,  # noqa: E731
                                             backend="triton")
    return weights, (q, k)


def _weights_case():
    """MultiHeadAttention's need_weights=True: P from q, k and the lse of their attention (a
    constant of the compiled function)."""
    q, k, v = randn(1, 4, 6, 16), randn(1, 2, 6, 16, seed=1), randn(1, 2, 6, 16, seed=2)
    with torch.no_grad(), fastattn.use_backend("torch"):
        _, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                       return_lse=True)

    def weights(q, k):
        return attention_weights(q, k, lse, scale=0.25, causal=True, backend="triton")

    return weights, (q, k)


# name -> (function, inputs), whether the backward graph holds kernels
CASES = {
    "softmax": (lambda: (lambda x, m: fastattn.softmax(x, scale=0.7, mask=m, causal=True),
                         (randn(2, 5, 37), randn(5, 37, seed=1))), True),
    "layer_norm": (lambda: (lambda x, r, w, b: fastattn.layer_norm(x, (24,), w, b, residual=r),
                            (randn(3, 4, 24), randn(3, 4, 24, seed=1), randn(24, seed=2),
                             randn(24, seed=3))), True),
    "rms_norm": (lambda: (lambda x, w: fastattn.rms_norm(x, (24,), w, eps=1e-6),
                          (randn(7, 24), randn(24, seed=1))), True),
    "rotary": (lambda: (lambda x: fastattn.apply_rotary(x, COS, SIN, seq_dim=1),
                        (randn(2, 9, 3, 16),)), True),
    "rotary_qk": (lambda: (lambda q, k: fastattn.apply_rotary_qk(q, k, COS, SIN, seq_dim=1,
                                                                 interleaved=True),
                           (randn(2, 9, 4, 14), randn(2, 9, 2, 14, seed=1))), True),
    "swiglu": (lambda: (fastattn.swiglu, (randn(3, 5, 37), randn(3, 5, 37, seed=1))), True),
    # the backward of these two is torch ops on every backend: no kernel there
    "merge_attention_states": (lambda: (fastattn.merge_attention_states,
                                        (randn(2, 3, 5, 8), randn(2, 3, 5),
                                         randn(2, 3, 5, 8, seed=1), randn(2, 3, 5, seed=2))),
                               False),
    "attention_weights": (_weights_case, False),
}


def test_every_op_with_traceable_launchers_has_a_twin():
    assert _triton.registered() == sorted([
        "attention", "attention_backward", "attention_weights", "layer_norm",
        "layer_norm_backward", "merge_attention_states", "rms_norm", "rms_norm_backward",
        "kvcache_attention", "rotary", "rotary_", "rotary_qk", "softmax", "softmax_backward",
        "swiglu", "swiglu_backward", "varlen_attention", "varlen_attention_backward"])
    for name in _triton.registered():
        assert hasattr(torch.ops.fastattn_triton, name)


@pytest.mark.parametrize("name", CASES)
def test_compiled_graph_holds_the_triton_kernels(name):
    make, backward_kernels = CASES[name]
    fn, inputs = make()
    capture = GraphCapture()
    with fastattn.use_backend("triton"):
        eager_outs, eager_grads = run(fn, inputs)
        outs, grads = run(fn, inputs, capture.backend)
    (forward,), (backward,) = capture.forward, capture.backward
    assert KERNEL_NODE in forward and OPAQUE not in forward, forward
    assert (KERNEL_NODE in backward) == backward_kernels and OPAQUE not in backward, backward
    # the same kernels on the same inputs: equal to the last bit
    for got, want in zip(outs + grads, eager_outs + eager_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def _fuzz_case(rng):
    """A random row-wise call: odd sizes, strided views, masks that empty whole rows, huge
    logits. Returns (name, fn, inputs)."""
    rows, n = int(rng.integers(1, 7)), int(rng.integers(1, 70))
    base = torch.from_numpy(rng.standard_normal((n + 3, 2 * rows))).float()
    x = base[1:n + 1, ::2].t()                     # (rows, n), strided and not contiguous
    kind = ("softmax", "layer_norm", "rms_norm")[int(rng.integers(0, 3))]
    if kind == "softmax":
        x = x * float(rng.choice([1.0, 1e4, 1e30]))
        keep = torch.from_numpy(rng.random((rows, n)) < 0.6)
        keep[int(rng.integers(0, rows))] = False   # a fully masked row gives 0
        causal = bool(rng.integers(0, 2))
        return kind, (lambda t: fastattn.softmax(t, mask=keep.to(DEVICE), causal=causal)), (
            x.to(DEVICE).requires_grad_(),)
    w = torch.from_numpy(rng.standard_normal(n)).float().to(DEVICE).requires_grad_()
    r = torch.from_numpy(rng.standard_normal((rows, n))).float().to(DEVICE).requires_grad_()
    if kind == "layer_norm":
        return kind, (lambda t, w, r: fastattn.layer_norm(t, (n,), w, None, residual=r)), (
            x.to(DEVICE).requires_grad_(), w, r)
    return kind, (lambda t, w: fastattn.rms_norm(t, (n,), w)), (x.to(DEVICE).requires_grad_(), w)


def _attention_fuzz_case(rng):
    """A random dense or packed attention call: odd lengths and head dims (aligned copies),
    GQA, causal in both alignments, windows, softcap, key_lengths, a bool mask that can empty
    whole rows, ALiBi and dropout. Returns (name, fn, inputs)."""
    def pick(*options):
        return options[int(rng.integers(0, len(options)))]

    hkv, group, d = int(rng.integers(1, 3)), int(rng.integers(1, 3)), pick(7, 16, 20, 33)
    h = hkv * group
    kw = dict(softcap=pick(0.0, 0.0, 3.0), dropout_p=pick(0.0, 0.0, 0.2))
    if rng.integers(0, 2):
        kw["window"] = (int(rng.integers(-1, 6)), int(rng.integers(-1, 3)))
    if rng.integers(0, 3) == 0:
        kw["alibi_slopes"] = torch.from_numpy(rng.random(h)).float().to(DEVICE)
    t = lambda *shape: torch.from_numpy(rng.standard_normal(shape)).float().to(DEVICE)  # noqa
    if rng.integers(0, 3) == 0:                        # packed sequences
        lens_q = [int(x) for x in rng.integers(0, 14, size=int(rng.integers(1, 4)))]
        lens_k = [int(x) for x in rng.integers(0, 14, size=len(lens_q))]
        cu = lambda lens: torch.tensor([0] + list(np.cumsum(lens)),  # noqa: E731
                                       dtype=torch.int32).to(DEVICE)
        cu_q, cu_k = cu(lens_q), cu(lens_k)
        causal = bool(rng.integers(0, 2))

        def fn(q, k, v):
            return fastattn.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                             is_causal=causal, return_lse=True, **kw)
        inputs = (t(sum(lens_q), h, d), t(sum(lens_k), hkv, d), t(sum(lens_k), hkv, d))
        return "varlen", fn, tuple(x.requires_grad_() for x in inputs)
    b, sq, sk = int(rng.integers(1, 3)), int(rng.integers(1, 20)), int(rng.integers(1, 24))
    kw.update(is_causal=bool(rng.integers(0, 2)), enable_gqa=group > 1,
              causal_alignment=pick("top_left", "bottom_right"))
    if rng.integers(0, 2):
        kw["key_lengths"] = torch.from_numpy(rng.integers(0, sk + 1, size=b)).to(DEVICE)
    mask = None
    if rng.integers(0, 3) == 0:
        mask = torch.from_numpy(rng.random((b, 1, sq, sk)) < 0.7).to(DEVICE)

    def fn(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, mask, return_lse=True, **kw)
    inputs = (t(b, h, sq, d), t(b, hkv, sk, d), t(b, hkv, sk, d))
    return "attention", fn, tuple(x.requires_grad_() for x in inputs)


def test_seeded_fuzz_compiled_twins_equal_eager():
    """Seeded random configurations: the compiled twins give the eager Triton results and
    gradients bit for bit (the eager kernels are fuzzed against fastattn.reference in
    tests/test_fuzz_*.py); dropout draws the same keep-mask for the same torch seed."""
    rng = np.random.default_rng(13)
    cases = [_fuzz_case(rng) for _ in range(6)] + [_attention_fuzz_case(rng) for _ in range(6)]
    with fastattn.use_backend("triton"):
        for i, (name, fn, inputs) in enumerate(cases):
            torch._dynamo.reset()
            capture = GraphCapture()
            eager_outs, eager_grads = _run_seeded(fn, inputs, seed=i)
            outs, grads = _run_seeded(fn, inputs, capture.backend, seed=i)
            assert KERNEL_NODE in capture.forward[-1], name
            assert OPAQUE not in capture.forward[-1], name
            for got, want in zip(outs + grads, eager_outs + eager_grads):
                torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=False)


def test_twins_pass_opcheck():
    """Schema, fake (traced from the body), autograd registration and AOT dispatch with
    dynamic shapes of the twins (torch.library.opcheck)."""
    from fastattn.ops import layer_norm, rotary, softmax, swiglu
    x, w = randn(5, 24), randn(24, seed=1)
    checks = [
        (softmax.softmax_op, (randn(3, 37), None, 0.5, True, "triton")),
        (swiglu.swiglu_op, (randn(5, 24), randn(5, 24, seed=1), "triton")),
        (layer_norm.rms_norm_op, (x, w, randn(5, 24, seed=2), 1e-6, "triton")),
        (rotary.rotary_qk_op, (randn(1, 6, 2, 8), randn(1, 6, 1, 8, seed=1), COS[:, :4],
                               SIN[:, :4], None, False, False, "triton")),
    ]
    from fastattn.ops import attention, varlen_attention
    from varlen_support import packed_inputs
    q, k, v = _qkv(1, 4, 2, 6, 9, 7)
    rng = torch.tensor([11, 1234], dtype=torch.int64)
    out, lse = torch.ops.fastattn.attention(q, k, v, None, None, rng, 0.3, True, True, 4, -1,
                                            0.0, 0.25, False, "triton")
    inp = packed_inputs([3, 0, 5], [4, 2, 5], 2, 1, 16, torch.float32, device=DEVICE)
    vq, vk, vv = (inp[n].requires_grad_() for n in "qkv")
    vargs = (inp["cu_q"], inp["cu_k"], 5, 5, rng, 0.25, True, -1, -1, 1.5, 0.2)
    vout, vlse = torch.ops.fastattn.varlen_attention(vq, vk, vv, *vargs, False, False, "triton")
    checks += [
        (attention.attention_op, (q, k, v, None, None, rng, 0.3, True, True, 4, -1, 0.0, 0.25,
                                  False, "triton")),
        (attention.attention_op, (q, k, v, randn(1, 4, 6, 9, seed=3),
                                  torch.tensor([5]).to(DEVICE), None, 0.3, False, False, -1, -1,
                                  2.0, 0.0, False, "triton",
                                  torch.tensor([[0.5, 0.25, 1.0, 2.0]]).to(DEVICE))),
        (attention.attention_backward_op, (randn(*out.shape, seed=4, grad=False), q.detach(),
                                           k.detach(), v.detach(), out.detach(), lse, None,
                                           None, rng, 0.3, True, True, 4, -1, 0.0, 0.25, False,
                                           False, "triton")),
        (varlen_attention.varlen_attention_op, (vq, vk, vv, *vargs, False, True, "triton")),
        (varlen_attention.varlen_attention_backward_op,
         (inp["dout"], vq.detach(), vk.detach(), vv.detach(), vout.detach(), vlse, *vargs,
          False, "triton")),
    ]
    for op, args in checks:
        torch.library.opcheck(op.triton_twin, args)


def _strided_heads():
    """(2, 9, 3, 16) rows of a wider tensor: not contiguous, rotated in place without a copy."""
    return randn(2, 9, 3, 20, grad=False, seed=4)[..., 2:18]


@pytest.mark.parametrize("case", ["contiguous_offsets", "strided_positions_interleaved"])
def test_inplace_rotary_compiles_to_its_twin(case):
    """apply_rotary(inplace=True): the graph holds the rotary kernel and writes x back (the
    twin's declared mutation); x afterwards equals the eager in-place result bit for bit, and
    the function's other tensors are untouched."""
    if case == "contiguous_offsets":
        make = lambda: randn(2, 9, 3, 16, grad=False)              # noqa: E731
        kw = dict(offsets=torch.tensor([0, 3]).to(DEVICE))
    else:
        make = _strided_heads
        kw = dict(positions=torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8],
                                          [3, 2, 1, 0, 0, 1, 2, 3, 4]]).to(DEVICE),
                  interleaved=True)

    def rotate(x):
        fastattn.apply_rotary(x, COS, SIN, seq_dim=1, inplace=True, **kw)
        return x * 1

    capture = GraphCapture()
    with fastattn.use_backend("triton"):
        want, got = make(), make()
        before = got.clone()
        rotate(want)
        out = torch.compile(rotate, fullgraph=True, dynamic=False, backend=capture.backend)(got)
    (forward,) = capture.forward
    assert KERNEL_NODE in forward and OPAQUE not in forward, forward
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert not torch.equal(got, before)


def test_mutating_twins_pass_opcheck():
    """The twins that write their inputs: each schema's mutation annotation matches what the
    body writes (the caches / x, nothing else), and the fake traced from the body agrees with
    the real call."""
    from fastattn.ops import kvcache_attention, rotary
    (q, k_cache, v_cache, k, v), kw = _kvcache_case("paged_rotary")
    kv_args = (q, k_cache, v_cache, k, v, kw["cache_seqlens"], kw["block_table"], None,
               kw["rotary_cos"], kw["rotary_sin"], True, 0.25, True, -1, -1, 0.0, "triton")
    rot_args = (_strided_heads(), COS[:, :4], SIN[:, :4], torch.tensor([1, 2]).to(DEVICE),
                False, False, "triton")
    for op, args in ((kvcache_attention.kvcache_attention_op, kv_args),
                     (rotary.rotary_inplace_op, rot_args)):
        result = torch.library.opcheck(op.triton_twin, args)
        assert set(result.values()) == {"SUCCESS"}, result


def test_compiled_triton_calls_are_logged_each_time_they_run():
    """record_dispatch() sees a twin's calls when the compiled graph runs (an effectful log op
    in the graph), every call, not once at trace time."""
    f = torch.compile(lambda x, w: fastattn.softmax(fastattn.rms_norm(x, (16,), w)),
                      fullgraph=True, backend="aot_eager")
    x, w = randn(4, 16), randn(16, seed=1)
    with fastattn.use_backend("triton"):
        for _ in range(2):
            with fastattn.record_dispatch() as calls:
                f(x, w).sum().backward()
            assert calls == [("rms_norm", "triton"), ("softmax", "triton")]


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch")
                                     if fastattn.available_backends("cpu").count(b)])
def test_other_backends_keep_the_opaque_op(backend):
    capture = GraphCapture()
    x = torch.randn(3, 11, requires_grad=True)
    with fastattn.use_backend(backend):
        outs, _ = run(lambda t: fastattn.softmax(t), [x], capture.backend)
    torch.testing.assert_close(outs[0], torch.softmax(x.detach(), -1))
    assert "torch.ops.fastattn.softmax.default" in capture.forward[0]
    assert KERNEL_NODE not in capture.forward[0]
    assert "torch.ops.fastattn.softmax_backward.default" in capture.backward[0]


def _sdpa(**kw):
    """fastattn.scaled_dot_product_attention(q, k, v, **kw) returning (out, lse)."""
    return lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)


def _qkv(b, h, hkv, sq, sk, d, *, grad=True):
    return randn(b, h, sq, d, grad=grad), randn(b, hkv, sk, d, seed=1, grad=grad), \
        randn(b, hkv, sk, d, seed=2, grad=grad)


def _attention_cases():
    """name -> (function, inputs): the attention features the twin's launchers decide on."""
    q, k, v = _qkv(1, 2, 2, 11, 13, 16)
    q4, k1, v1 = _qkv(2, 4, 1, 9, 9, 16)                 # GQA / MQA: 4 query heads, 1 kv head
    kl = torch.tensor([9, 4]).to(DEVICE)
    keep = (torch.rand(1, 2, 11, 13, generator=torch.Generator().manual_seed(5)) < 0.7)
    fmask = randn(1, 1, 11, 13, seed=6)                  # float mask, broadcast, with its gradient
    slopes = torch.tensor([0.5, 0.125]).to(DEVICE)
    # odd head dim: fp32 rows of 7 elements (28 bytes) are copied into 16-byte aligned rows;
    # a view at storage offset 1 (4 bytes) is copied too
    qo, ko, vo = _qkv(1, 2, 2, 10, 12, 7)
    base = randn(1, 2, 12, 17, seed=7)
    kv_off = base[..., 1:]                               # (1, 2, 12, 16) at offset 1
    return {
        "causal": (_sdpa(is_causal=True), (q, k, v)),
        "causal_bottom_right_window": (_sdpa(is_causal=True, window=(3, 0),
                                             causal_alignment="bottom_right"), (q, k, v)),
        "gqa_key_lengths": (_sdpa(enable_gqa=True, key_lengths=kl), (q4, k1, v1)),
        "softcap_alibi": (_sdpa(softcap=2.0, alibi_slopes=slopes, is_causal=True), (q, k, v)),
        "bool_mask": (lambda q, k, v: fastattn.scaled_dot_product_attention(
            q, k, v, keep.to(DEVICE), return_lse=True), (q, k, v)),
        "float_mask_grad": (lambda q, k, v, m: fastattn.scaled_dot_product_attention(
            q, k, v, m, return_lse=True), (q, k, v, fmask)),
        "odd_head_dim": (_sdpa(is_causal=True), (qo, ko, vo)),
        "storage_offset": (lambda q, b: fastattn.scaled_dot_product_attention(
            q, b[..., 1:], b[..., 1:], return_lse=True), (randn(1, 2, 5, 16), base)),
        # the split-K decode forward (Sq <= 16, Sk >= 512), the usual backward
        "decode": (_sdpa(enable_gqa=True), _qkv(1, 4, 2, 3, 530, 16)),
    }


ATTENTION_CASES = _attention_cases()


def _run_seeded(fn, inputs, compile_backend=None, seed=0):
    """run() with torch's generator seeded first (the dropout rng is drawn from it)."""
    torch.manual_seed(seed)
    return run(fn, inputs, compile_backend)


def _check_compiled_equals_eager(fn, inputs, opaque_op, seed=0):
    """Compiled on triton: the graphs hold kernel nodes, not `opaque_op`, forward and backward,
    and the results and gradients are the eager ones bit for bit (the same kernels on the same
    inputs and dropout rng)."""
    capture = GraphCapture()
    with fastattn.use_backend("triton"):
        eager_outs, eager_grads = _run_seeded(fn, inputs, seed=seed)
        outs, grads = _run_seeded(fn, inputs, capture.backend, seed=seed)
    (forward,), (backward,) = capture.forward, capture.backward
    for code in (forward, backward):
        assert KERNEL_NODE in code and OPAQUE not in code, code
        assert opaque_op not in code, code
    for got, want in zip(outs + grads, eager_outs + eager_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    return forward, backward


@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_attention_compiles_to_its_twin(name):
    fn, inputs = ATTENTION_CASES[name]
    forward, _ = _check_compiled_equals_eager(fn, inputs, "torch.ops.fastattn.attention")
    assert "fastattn_triton.log_dispatch" in forward


def test_attention_dropout_twin_equals_eager_for_the_same_seed():
    """Dropout: the kernels load the (seed, offset) tensor on the device, so the traced twin
    draws the same keep-mask as the eager call for the same torch seed (bit for bit), and a
    different seed draws another."""
    fn = _sdpa(dropout_p=0.3, is_causal=True)
    inputs = _qkv(1, 2, 2, 11, 13, 16)
    _check_compiled_equals_eager(fn, inputs, "torch.ops.fastattn.attention", seed=3)
    torch._dynamo.reset()
    with fastattn.use_backend("triton"):
        a, _ = _run_seeded(fn, inputs, "aot_eager", seed=3)
        b, _ = _run_seeded(fn, inputs, "aot_eager", seed=4)
    assert not torch.equal(a[0], b[0])


def test_attention_backward_with_lse_compiles_to_the_backward_twin():
    q, k, v = _qkv(1, 2, 2, 7, 9, 16, grad=False)
    dout = randn(1, 2, 7, 16, grad=False, seed=3)

    def backward(*args):
        return fastattn.attention_backward_with_lse(*args, is_causal=True)

    capture = GraphCapture()
    with fastattn.use_backend("triton"):
        out, lse = fastattn.attention_forward_with_lse(q, k, v, is_causal=True)
        want = backward(dout, q, k, v, out, lse)
        got = torch.compile(backward, fullgraph=True, backend=capture.backend)(dout, q, k, v,
                                                                               out, lse)
    (graph,) = capture.forward
    assert KERNEL_NODE in graph and OPAQUE not in graph, graph
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def _varlen(**kw):
    def fn(q, k, v, cu_q, cu_k):
        return fastattn.varlen_attention(q, k, v, cu_q, cu_k, 12, 12, return_lse=True, **kw)
    return fn


VARLEN_CASES = {
    "causal_window_gqa": (_varlen(is_causal=True, window=(4, -1)), {}),
    "softcap_alibi": (_varlen(softcap=2.0, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 1.0])),
                      {}),
    "dropout": (_varlen(dropout_p=0.25, is_causal=True), {}),
    "odd_head_dim": (_varlen(is_causal=True), dict(head_dim=7)),
}


@pytest.mark.parametrize("name", VARLEN_CASES)
def test_varlen_attention_compiles_to_its_twin(name):
    from varlen_support import packed_inputs
    fn, opts = VARLEN_CASES[name]
    inp = packed_inputs([5, 0, 12], [7, 3, 12], 4, 2, opts.get("head_dim", 16), torch.float32,
                        device=DEVICE, seed=2)
    if "alibi" in name:
        fn = _varlen(softcap=2.0, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 1.0]).to(DEVICE))
    q, k, v = (inp[n].requires_grad_() for n in "qkv")
    cu_q, cu_k = inp["cu_q"], inp["cu_k"]
    forward, _ = _check_compiled_equals_eager(
        lambda q, k, v: fn(q, k, v, cu_q, cu_k), (q, k, v), "torch.ops.fastattn.varlen",
        seed=5)
    # the offsets' values are checked when the graph runs, before the kernels read them
    assert "fastattn_triton.varlen_checked_offsets" in forward


def test_varlen_twin_checks_the_offsets_when_the_graph_runs():
    from varlen_support import packed_inputs
    inp = packed_inputs([5, 0, 12], [7, 3, 12], 4, 2, 16, torch.float32, device=DEVICE)
    compiled = torch.compile(_varlen(is_causal=True), fullgraph=True, backend="aot_eager")
    bad = torch.tensor([0, 9, 5, 17], dtype=torch.int32).to(DEVICE)
    with fastattn.use_backend("triton"):
        out, _ = compiled(inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"])
        with pytest.raises((ValueError, RuntimeError), match="cu_seqlens_q"):
            compiled(inp["q"], inp["k"], inp["v"], bad, inp["cu_k"])
    assert out.shape == inp["q"].shape


def _kvcache_case(name):
    """(arguments, keyword arguments) of a fastattn.kvcache_attention call; the caches are
    fresh tensors on each call, so the eager and the compiled run append to their own."""
    b, hkv, d, s_max = 2, 2, 16, 40
    g = torch.Generator().manual_seed(len(name))
    t = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    q, k_new, v_new = t(b, 3, 4, d), t(b, 3, hkv, d), t(b, 3, hkv, d)
    seqlens = torch.tensor([5, 17], dtype=torch.int32).to(DEVICE)
    kw = {}
    if name == "paged_rotary":
        block_size, n_blocks = 3, 30                    # 3 does not divide the lengths
        k_cache, v_cache = t(n_blocks, block_size, hkv, d), t(n_blocks, block_size, hkv, d)
        perm = torch.randperm(n_blocks, generator=g)[:2 * 14].view(2, 14)
        kw["block_table"] = perm.to(torch.int32).to(DEVICE)
        cos, sin = fastattn.rotary_cache(s_max, d)
        kw.update(rotary_cos=cos.to(DEVICE), rotary_sin=sin.to(DEVICE), rotary_interleaved=True)
    else:
        k_cache, v_cache = t(3, s_max, hkv, d), t(3, s_max, hkv, d)
        kw["cache_batch_idx"] = torch.tensor([2, 0], dtype=torch.int32).to(DEVICE)
        if name == "window_softcap_alibi":
            kw.update(window=(6, 0), softcap=3.0,
                      alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 1.0]).to(DEVICE))
    if name == "no_append":
        return (q, k_cache, v_cache, None, None), dict(kw, cache_seqlens=seqlens)
    return (q, k_cache, v_cache, k_new, v_new), dict(kw, cache_seqlens=seqlens)


@pytest.mark.parametrize("name", ["append", "paged_rotary", "window_softcap_alibi", "no_append"])
def test_kvcache_attention_compiles_to_its_twin(name):
    """The traced twin: the rotary and split-K kernels are graph nodes, the in-place append
    (declared in mutates_args) is functionalised and written back to the caches. Two decode
    steps of the compiled function give the eager outputs, lse and caches bit for bit."""
    def step(q, k_cache, v_cache, k, v, **kw):
        return fastattn.kvcache_attention(q, k_cache, v_cache, k, v, return_lse=True, **kw)

    capture = GraphCapture()
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=capture.backend)
    with fastattn.use_backend("triton"):
        for fn in (step, compiled):
            args, kw = _kvcache_case(name)
            results = []
            for _ in range(2):                          # the second step appends after the first
                results += [*fn(*args, **kw), args[1].clone(), args[2].clone()]
                kw["cache_seqlens"] = kw["cache_seqlens"] + (3 if args[3] is not None else 0)
            if fn is step:
                want = results
    (forward,) = set(capture.forward)
    assert KERNEL_NODE in forward and OPAQUE not in forward, forward
    if name != "no_append":
        assert "index_put" in forward, forward          # the append, functionalised
    for got, expect in zip(results, want):
        torch.testing.assert_close(got, expect, atol=0, rtol=0)
    if name != "no_append":                             # the caches did change
        assert not torch.equal(want[2], _kvcache_case(name)[0][1])


def test_eager_calls_do_not_use_the_twins():
    with fastattn.use_backend("triton"), fastattn.record_dispatch() as calls:
        y = fastattn.softmax(randn(2, 9))
    assert calls == [("softmax", "triton")]
    assert "fastattn_softmax" in y.grad_fn.name() and "triton" not in y.grad_fn.name()


@pytest.mark.gpu
@pytest.mark.skipif(interpreting(), reason="inductor compiles Triton kernels for CUDA tensors "
                                           "only; the interpreter runs CPU tensors")
def test_inductor_compiles_the_twins_on_cuda():
    x, r = randn(4, 8, 64), randn(4, 8, 64, seed=1)
    w = randn(64, seed=2)

    def block(x, r, w):
        y, h = fastattn.rms_norm(x, (64,), w, residual=r)
        return fastattn.softmax(y * 2) + h

    with fastattn.use_backend("triton"):
        eager_outs, eager_grads = run(block, [x, r, w])
        outs, grads = run(block, [x, r, w], "inductor")
    for got, want in zip(outs, eager_outs):
        torch.testing.assert_close(got, want, **COMPOSED_FP32_TOL)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, **COMPOSED_FP32_GRAD_TOL)
