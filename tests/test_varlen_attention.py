"""fastattn.varlen_attention (packed variable-length attention) on every backend: parity with a
per-sequence loop of the dense reference (forward, lse, gradients; the 2x rule for fp16/bf16,
tight bounds for fp32 against fp64), dropout, determinism, bad input, torch.compile, dispatch.

Run the triton cases with TRITON_INTERPRET=1 in the environment (as `make test` does).
"""

import pytest
import torch

import fastattn
from conftest import TESTABLE_BACKENDS, backend_device
from tolerances import (COMPOSED_FP32_TOL, ELEMENTWISE_FP32_TOL, FP32_ATOL, VARLEN_LSE_LOWP_ATOL,
                        assert_within_2x)
from varlen_support import keep_mask, lse_matches, oracle, packed_inputs, run

KERNEL_BACKENDS = [b for b in ("cpu", "triton") if b in TESTABLE_BACKENDS]
BACKENDS = KERNEL_BACKENDS + ["torch"]

# (name, lens_q, lens_k, H, Hkv, D, options): ragged lengths with 0 and 1, Sq != Sk per
# sequence (both ways), GQA/MQA, causal, windows that empty rows, softcap, padded head dims.
CASES = [
    ("causal-gqa", [0, 1, 7, 33, 20], [0, 1, 7, 33, 20], 2, 1, 32, dict(is_causal=True)),
    ("cross-window-softcap", [5, 1, 0, 17, 3], [9, 0, 3, 40, 1], 2, 2, 40,
     dict(window=(6, 2), softcap=5.0, scale=0.3)),
    ("causal-window-mqa", [1, 40, 0, 19], [4, 50, 2, 19], 2, 1, 16,
     dict(is_causal=True, window=(8, 0))),
]


def _dtypes(backend):
    if backend == "torch":
        return [torch.float64, torch.float32, torch.bfloat16]
    return [torch.float32, torch.float16, torch.bfloat16]


def _cases(backend, dtype):
    """Every case on the C++ and torch backends; the interpreter (slow) runs every case in fp32
    and each low-precision dtype on two of them."""
    if backend != "triton" or dtype == torch.float32:
        return CASES
    return [CASES[0], CASES[1]] if dtype == torch.float16 else [CASES[0], CASES[2]]


PARAMS = [(b, dt, c) for b in BACKENDS for dt in _dtypes(b) for c in _cases(b, dt)]


def _window(opts):
    w = opts.get("window")
    return (-1, -1) if w is None else w


def _check_against_oracle(got, inp, dtype, opts, keep=None, dropout_p=0.0):
    kw = dict(scale=opts.get("scale"), causal=opts.get("is_causal", False),
              window=_window(opts), softcap=opts.get("softcap", 0.0), dropout_mask=keep,
              dropout_p=dropout_p)
    names = ("out", "lse", "dq", "dk", "dv")
    if dtype in (torch.float16, torch.bfloat16):
        ref = oracle(inp, torch.float32, **kw)
        pt = oracle(inp, dtype, **kw)
        for name, a, r, p in zip(names, got, ref, pt):
            if name == "lse":
                lse_matches(a, r, VARLEN_LSE_LOWP_ATOL)
            else:
                assert_within_2x(a, r.to(dtype), p, name=name)
    else:
        ref = oracle(inp, torch.float64, **kw)
        for name, a, r in zip(names, got, ref):
            assert a.dtype == (torch.float32 if name == "lse" else dtype), name
            if name == "lse":
                lse_matches(a, r, FP32_ATOL)
            else:
                torch.testing.assert_close(a.double(), r, **COMPOSED_FP32_TOL,
                                           msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend,dtype,case", PARAMS,
                         ids=[f"{b}-{str(d)[6:]}-{c[0]}" for b, d, c in PARAMS])
def test_parity(backend, dtype, case):
    _, lens_q, lens_k, h, hkv, d, opts = case
    inp = packed_inputs(lens_q, lens_k, h, hkv, d, dtype, backend_device(backend))
    got = run(inp, backend=backend, **opts)
    assert got[0].shape == inp["q"].shape and got[1].shape == (h, sum(lens_q))
    _check_against_oracle(got, inp, dtype, opts)


@pytest.mark.parametrize("dtype,lens_q,lens_k,hkv", [
    (torch.float32, [600, 0, 130, 1], [700, 5, 130, 0], 1),   # few (sequence, kv head) pairs:
    (torch.bfloat16, [530, 129, 1, 260], [530, 129, 1, 600], 2),  # the backward splits keys
], ids=["fp32", "bf16"])
def test_cpu_long_sequences(dtype, lens_q, lens_k, hkv):
    """Sequences longer than the CPU kernels' key blocks (512 forward, 128 backward) and the
    backward's key-chunk split (few sequence x kv-head pairs), with a window."""
    inp = packed_inputs(lens_q, lens_k, 2, hkv, 32, dtype, seed=9)
    opts = dict(is_causal=True, window=(300, -1))
    got = run(inp, backend="cpu", **opts)
    _check_against_oracle(got, inp, dtype, opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_keep_mask_and_is_seeded(backend):
    """Dropout uses the backend's documented keep-mask (so the oracle can apply the same one),
    is reproducible by torch.manual_seed, and its backward uses the same mask."""
    inp = packed_inputs([3, 0, 20, 1], [5, 4, 20, 0], 2, 1, 16, torch.float32,
                        backend_device(backend), seed=3)
    opts = dict(is_causal=True, dropout_p=0.25)
    torch.manual_seed(123)
    got = run(inp, backend=backend, **opts)
    torch.manual_seed(123)
    seed, offset = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64).tolist()
    keep = keep_mask(backend, inp, 0.25, seed, offset)
    assert 0.6 < keep.float().mean().item() < 0.9           # the mask actually drops
    _check_against_oracle(got, inp, torch.float32, opts, keep=keep, dropout_p=0.25)
    torch.manual_seed(123)
    again = run(inp, backend=backend, **opts)
    for a, b in zip(got, again):
        assert torch.equal(a, b)
    torch.manual_seed(124)
    with fastattn.use_backend(backend):
        other = fastattn.varlen_attention(inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"],
                                          inp["max_q"], inp["max_k"], **opts)
    assert not torch.equal(got[0], other)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_backward_is_bitwise(backend):
    inp = packed_inputs([17, 0, 40, 1], [17, 5, 50, 3], 2, 1, 32, torch.float32,
                        backend_device(backend), seed=5)
    first = run(inp, backend=backend, is_causal=True, deterministic=True)
    second = run(inp, backend=backend, is_causal=True, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_is_recorded(backend):
    inp = packed_inputs([2, 3], [2, 3], 2, 2, 16, torch.float32, backend_device(backend))
    with fastattn.use_backend(backend), fastattn.record_dispatch() as calls:
        fastattn.varlen_attention(inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], 3, 3)
    assert calls == [("varlen_attention", backend)]


def test_auto_picks_cpu_kernel_and_torch_for_fp64():
    inp = packed_inputs([2, 3], [2, 3], 2, 2, 16, torch.float32)
    with fastattn.record_dispatch() as calls:
        fastattn.varlen_attention(inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], 3, 3)
        fastattn.varlen_attention(inp["q"].double(), inp["k"].double(), inp["v"].double(),
                                  inp["cu_q"], inp["cu_k"], 3, 3)
    expected = "cpu" if "cpu" in TESTABLE_BACKENDS else "torch"
    assert calls == [("varlen_attention", expected), ("varlen_attention", "torch")]


def test_all_sequences_empty_or_keyless():
    """Zero tokens, and queries without keys: output 0, lse -inf, zero gradients."""
    for backend in BACKENDS:
        inp = packed_inputs([0, 3, 0], [0, 0, 0], 2, 2, 16, torch.float32,
                            backend_device(backend))
        out, lse, dq, dk, dv = run(inp, backend=backend, is_causal=True)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == (0, 2, 16)
        inp = packed_inputs([0], [0], 2, 2, 16, torch.float32, backend_device(backend))
        out, lse, dq, dk, dv = run(inp, backend=backend)
        assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


# ------------------------------------------------------------------ bad input

def _bad_call(**over):
    inp = packed_inputs([3, 4], [3, 4], 2, 2, 16, torch.float32)
    args = dict(q=inp["q"], k=inp["k"], v=inp["v"], cu_seqlens_q=inp["cu_q"],
                cu_seqlens_k=inp["cu_k"], max_seqlen_q=4, max_seqlen_k=4)
    args.update(over)
    return fastattn.varlen_attention(**args)


@pytest.mark.parametrize("over,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 5, 7], dtype=torch.int32)), "max_seqlen_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32)), "non-decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int64)), "cu_seqlens_k.*int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 5, 7], dtype=torch.int32)), "same size"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), "cu_seqlens_q.*last"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), "cu_seqlens_q.*start"),
    (dict(cu_seqlens_q=torch.tensor([[0, 3, 7]], dtype=torch.int32)), "cu_seqlens_q.*1-D"),
    (dict(max_seqlen_k=3), "max_seqlen_k"),
    (dict(max_seqlen_q=-1), "max_seqlen_q"),
    (dict(k=torch.zeros(7, 3, 16)), "heads"),
    (dict(v=torch.zeros(7, 2, 16, dtype=torch.float16)), "v"),
    (dict(q=torch.zeros(7, 2, 8)), "head dim"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(window=(-2, 0)), "window"),
])
def test_bad_input_names_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(**over)


def test_max_seqlen_must_be_int():
    with pytest.raises(TypeError, match="max_seqlen_q"):
        _bad_call(max_seqlen_q=torch.tensor(4))


def test_cpu_op_checks_offsets_itself():
    """The C++ entry validates every offset (no out-of-bounds read whoever calls it)."""
    inp = packed_inputs([3, 4], [3, 4], 2, 2, 16, torch.float32)
    op = torch.ops.fastattn_kernels.varlen_attention_forward
    tail = (1.0, False, -1, -1, 0.0, 0.0, 0, 0)
    for cu_q, mq, match in ((torch.tensor([0, 9, 7], dtype=torch.int32), 9, "non-decreasing"),
                            (torch.tensor([0, 3, 8], dtype=torch.int32), 5, "token count"),
                            (torch.tensor([0, 3, 7], dtype=torch.int32), 3, "max_seqlen_q"),
                            (torch.tensor([0, 3, 7]), 4, "int32")):
        with pytest.raises(RuntimeError, match=match):
            op(inp["q"], inp["k"], inp["v"], cu_q, inp["cu_k"], mq, 4, *tail)


# ------------------------------------------------------------------ torch.compile

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compile_fullgraph(backend):
    if backend not in TESTABLE_BACKENDS:
        pytest.skip(f"{backend} backend unavailable")
    torch._dynamo.reset()
    inp = packed_inputs([5, 0, 12], [7, 3, 12], 4, 2, 16, torch.float32, seed=2)

    def fn(q, k, v, cu_q, cu_k):
        out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 12, 12, is_causal=True,
                                             window=(4, -1), return_lse=True)
        return out * 2, lse

    results = []
    with fastattn.use_backend(backend):
        for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            q, k, v = (inp[n].detach().clone().requires_grad_() for n in "qkv")
            out, lse = f(q, k, v, inp["cu_q"], inp["cu_k"])
            out.backward(inp["dout"])
            results.append((out, lse, q.grad, k.grad, v.grad))
        # offsets are still validated inside the compiled graph
        bad = torch.tensor([0, 9, 5, 24], dtype=torch.int32)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        with pytest.raises((ValueError, RuntimeError), match="cu_seqlens_q"):
            compiled(inp["q"], inp["k"], inp["v"], bad, inp["cu_k"])
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **ELEMENTWISE_FP32_TOL)


def test_opcheck_custom_op():
    inp = packed_inputs([3, 0, 5], [4, 2, 5], 2, 1, 16, torch.float32)
    args = (inp["q"].requires_grad_(), inp["k"].requires_grad_(), inp["v"].requires_grad_(),
            inp["cu_q"], inp["cu_k"], 5, 5, None, 0.25, True, -1, -1, 0.0, 0.0, False, False,
            "torch")
    torch.library.opcheck(torch.ops.fastattn.varlen_attention.default, args)


def test_opcheck_cpu_ops():
    """The C++ kernel ops' schemas and kernels agree (they have no fakes: they run only inside
    fastattn::varlen_attention's body)."""
    inp = packed_inputs([3, 0, 5], [4, 2, 5], 2, 1, 16, torch.float32)
    tail = (0.25, True, -1, -1, 0.0, 0.0, 0, 0)
    out, lse = torch.ops.fastattn_kernels.varlen_attention_forward(
        inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], 5, 5, *tail)
    torch.library.opcheck(torch.ops.fastattn_kernels.varlen_attention_forward.default,
                          (inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], 5, 5, *tail),
                          test_utils=("test_schema",))
    torch.library.opcheck(torch.ops.fastattn_kernels.varlen_attention_backward.default,
                          (inp["dout"], inp["q"], inp["k"], inp["v"], out, lse, inp["cu_q"],
                           inp["cu_k"], 5, 5, *tail), test_utils=("test_schema",))


@pytest.mark.parametrize("arch,kind,prec,block_d", [(80, "fwd", "ieee", 64),
                                                    (80, "dq", "ieee", 128),
                                                    (90, "dkdv", "tf32", 128)])
def test_autotune_prune_uses_varlen_tiles(arch, kind, prec, block_d):
    """The packed mode's autotuner keeps only VARLEN_TABLE's tiles where the dense tiles
    spilled in that mode (static report), and the dense mode keeps its own."""
    from fastattn.kernels import _attention_configs as cfg

    def tiles(varlen):
        return set(cfg.prune_tiles(kind, arch, block_d, 4, prec, varlen, rows=4096, cols=4096))

    assert tiles(True) == set(cfg.VARLEN_TABLE[(arch, kind, 4, prec, block_d)])
    assert tiles(False) == set(cfg.valid_configs(kind, arch, block_d, 4, prec))
    assert tiles(True) != tiles(False)
