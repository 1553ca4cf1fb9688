"""The eager fast path (csrc/eager.cpp, fastattn/_eager.py): which calls take it, and that it
computes bitwise what the general path computes.

The fast path is taken when the general path is provably not needed: plain CPU tensors that
need no gradient, the cpu backend requested or chosen by auto, outside torch.compile, in the
plain case of each op. "Taken" is observed by making the general path's selector raise; "not
taken" by seeing the selector called. Bitwise equality with the general path holds because both
call the same registered kernel op with the same arguments.
"""

import contextlib
import random

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import _backend

# make test builds fastattn._C: without it these tests fail (the fast path declines), they do
# not skip; the no-extension behaviour is test_without_the_extension_every_function_declines.

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def selector_calls(monkeypatch, *, forbid=False):
    """Count calls of the general path's selector (or make it raise with forbid=True)."""
    calls = []
    real = _backend.select

    def select(op, *args, **kwargs):
        calls.append(op)
        if forbid:
            raise AssertionError(f"the general path ran for {op}")
        return real(op, *args, **kwargs)

    monkeypatch.setattr(_backend, "select", select)
    try:
        yield calls
    finally:
        monkeypatch.setattr(_backend, "select", real)


COS, SIN = fastattn.rotary_cache(64, 16)
# linear's weight (out_features 5, in_features 48) and bias, applied to x (3, 48)
_LIN = torch.Generator().manual_seed(1)
LIN_W, LIN_B = torch.randn(5, 48, generator=_LIN), torch.randn(5, generator=_LIN)
OPS = ["softmax", "rms_norm", "layer_norm", "attention", "rotary", "rotary_qk",
       "kvcache_attention", "swiglu", "linear"]
# the op name the selector and record_dispatch() see
LOGGED = {"rotary_qk": "rotary"}


def _calls(q, k, v, x, w):
    # q (1, 4, 1, 32): rotated (its first 32 features, positions in the 64-row tables) and
    # attending to k/v (1, 4, 40, 32) read as a (B, S, H, D) cache
    pos = torch.tensor([[5]])
    return {
        "softmax": lambda: fastattn.softmax(x, -1),
        "rms_norm": lambda: fastattn.rms_norm(x, (x.shape[-1],), w),
        "layer_norm": lambda: fastattn.layer_norm(x, x.shape[-1:], w, w * 0.5),
        "attention": lambda: fastattn.scaled_dot_product_attention(q, k, v),
        "rotary": lambda: fastattn.apply_rotary(q, COS, SIN, seq_dim=2, positions=pos),
        "rotary_qk": lambda: torch.cat(fastattn.apply_rotary_qk(q, q * 2, COS, SIN,
                                                                seq_dim=2, positions=pos)),
        "kvcache_attention": lambda: fastattn.kvcache_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cache_seqlens=40),
        "swiglu": lambda: fastattn.swiglu(x, x.flip(-1)),
        "linear": lambda: fastattn.linear(x, LIN_W, LIN_B),
    }


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 32, generator=g)
    k = torch.randn(1, 4, 40, 32, generator=g)
    v = torch.randn(1, 4, 40, 32, generator=g)
    x = torch.randn(3, 48, generator=g).requires_grad_(requires_grad)
    w = torch.randn(48, generator=g)
    return q, k, v, x, w


@pytest.mark.parametrize("op", OPS)
def test_plain_call_skips_the_general_path(monkeypatch, op):
    fn = _calls(*_inputs())[op]
    with selector_calls(monkeypatch, forbid=True):
        with torch.no_grad():
            no_grad_out = fn()
        out = fn()        # grad mode on, but nothing requires grad
    assert torch.equal(out, no_grad_out)


@pytest.mark.parametrize("op", OPS)
def test_fast_path_logs_dispatch(op):
    fn = _calls(*_inputs())[op]
    with fastattn.record_dispatch() as calls, torch.no_grad():
        fn()
    assert calls == [(LOGGED.get(op, op), "cpu")]


class _Subclass(torch.Tensor):
    pass


class _Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _declined_contexts():
    """(name, context manager, input transform): calls the fast path must leave to the general
    path, each because the general path does something the fast path does not."""
    return [
        ("use_backend(torch)", lambda: fastattn.use_backend("torch"), None),
        ("torch function mode", _Mode, None),
        ("autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16), None),
        ("subclass", contextlib.nullcontext, lambda t: t.as_subclass(_Subclass)),
        ("negative view", contextlib.nullcontext, torch._neg_view),
    ]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", range(len(_declined_contexts())),
                         ids=[c[0] for c in _declined_contexts()])
def test_declined_calls_take_the_general_path(monkeypatch, op, case):
    _, ctx, transform = _declined_contexts()[case]
    q, k, v, x, w = _inputs()
    if transform is not None:
        q, x = transform(q), transform(x)
    fn = _calls(q, k, v, x, w)[op]
    with selector_calls(monkeypatch) as calls, torch.no_grad(), ctx():
        fn()
    assert calls == [LOGGED.get(op, op)]


def test_env_backend_is_read_by_the_fast_path(monkeypatch):
    q, k, v, x, w = _inputs()
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    with selector_calls(monkeypatch) as calls, torch.no_grad():
        fastattn.softmax(x, -1)
    assert calls == ["softmax"]
    monkeypatch.setenv("FASTATTN_BACKEND", " CPU ")
    with selector_calls(monkeypatch, forbid=True), torch.no_grad():
        fastattn.softmax(x, -1)
    monkeypatch.setenv("FASTATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTATTN_BACKEND"):
        fastattn.softmax(x, -1)


def test_gradients_take_the_general_path(monkeypatch):
    q, k, v, x, w = _inputs(requires_grad=True)
    with selector_calls(monkeypatch) as calls:
        y = fastattn.softmax(x, -1)
    assert calls == ["softmax"] and y.requires_grad
    y.sum().backward()
    assert x.grad is not None


def test_vmap_takes_the_general_path(monkeypatch):
    x = torch.randn(2, 3, 16)
    with selector_calls(monkeypatch) as calls:
        out = torch.vmap(lambda t: fastattn.softmax(t, -1))(x)
    assert calls and torch.allclose(out, torch.softmax(x, -1), atol=1e-6)


@pytest.mark.parametrize("call", [
    lambda x, q: fastattn.softmax(x, 5),
    lambda x, q: fastattn.softmax(x[0], -1, causal=True),
    lambda x, q: fastattn.rms_norm(x, (7,)),
    lambda x, q: fastattn.rms_norm(x, x.shape[-1], torch.ones(3)),
    lambda x, q: fastattn.layer_norm(x, (16,), None, torch.ones(2, 8)),
    lambda x, q: fastattn.scaled_dot_product_attention(q, q, q, scale=float("nan")),
    lambda x, q: fastattn.scaled_dot_product_attention(q, q, q, dropout_p=1.5),
    lambda x, q: fastattn.scaled_dot_product_attention(q, q[:, :2], q[:, :2]),
    lambda x, q: fastattn.scaled_dot_product_attention(q, q[..., :3], q),
    lambda x, q: fastattn.linear(x, torch.randn(5, 15)),
    lambda x, q: fastattn.linear(x, torch.randn(5, 16), torch.randn(4)),
    lambda x, q: fastattn.linear(x, torch.randn(5, 16), torch.randn(1, 5)),
    lambda x, q: fastattn.linear(x, torch.randn(5, 16).half()),
    lambda x, q: fastattn.linear(x, torch.randn(5, 16), torch.randn(5).bfloat16()),
    lambda x, q: fastattn.linear(x, torch.randn(16)),
    lambda x, q: fastattn.linear(x[0, 0], torch.randn(5, 1)),
], ids=["softmax-dim", "softmax-causal-1d", "rms-shape", "rms-weight", "ln-bias",
        "sdpa-scale",
        "sdpa-dropout", "sdpa-heads", "sdpa-key-dim", "linear-in-features", "linear-bias-shape",
        "linear-bias-2d", "linear-weight-dtype", "linear-bias-dtype", "linear-weight-1d",
        "linear-0d-input"])
def test_invalid_arguments_get_the_general_paths_errors(call):
    x, q = torch.randn(3, 16), torch.randn(1, 4, 5, 8)
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError)):
        call(x, q)


def test_value_head_dim_other_than_query_runs_on_torch():
    """The cpu kernels take one head dim: auto hands Dv != D to the torch backend."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4)
    with fastattn.record_dispatch() as calls, torch.no_grad():
        out = fastattn.scaled_dot_product_attention(q, k, v)
    assert calls == [("attention", "torch")] and out.shape == (1, 2, 3, 4)


def _random_case(rng):
    dtype = rng.choice(DTYPES)
    op = rng.choice(["softmax", "rms_norm", "layer_norm", "attention"])
    if op == "attention":
        b, hkv, group = rng.randint(1, 3), rng.randint(1, 3), rng.choice([1, 1, 2])
        sq, sk, d = rng.choice([1, 1, 2, 7]), rng.randint(1, 70), rng.choice([8, 16, 24, 64])
        q = torch.randn(b, hkv * group, sq, d, dtype=dtype)
        kv_shape = (b, sk, hkv, d) if rng.random() < 0.5 else (b, hkv, sk, d)
        k, v = (torch.randn(kv_shape, dtype=dtype) for _ in range(2))
        if kv_shape[1] == sk:       # a (B, S, H, D) cache viewed as (B, H, S, D)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        kw = dict(is_causal=rng.random() < 0.3, enable_gqa=group > 1,
                  scale=rng.choice([None, 0.3]))
        return op, (q, k, v), kw
    rows = rng.choice([(1,), (3,), (2, 5)])
    n = rng.choice([1, 7, 64, 129, 512])
    x = torch.randn(*rows, n, dtype=dtype) * rng.choice([1.0, 30.0])
    if rng.random() < 0.3 and x.dim() >= 2:         # rows strided, last dim contiguous
        x = torch.randn(*rows[:-1], rows[-1] * 2, n, dtype=dtype)[..., ::2, :]
    if op == "softmax":
        return op, (x,), dict(dim=-1, scale=rng.choice([None, 0.5]),
                              causal=rng.random() < 0.3 and x.dim() >= 2)
    w = torch.randn(n, dtype=dtype) if rng.random() < 0.7 else None
    if op == "layer_norm":
        bias = torch.randn(n, dtype=dtype) if rng.random() < 0.7 else None
        return op, (x, (n,), w, bias), dict(eps=rng.choice([1e-5, 1e-6]))
    return op, (x, (n,), w), dict(eps=rng.choice([None, 1e-6]))


def _public(op):
    return {"softmax": fastattn.softmax, "rms_norm": fastattn.rms_norm,
            "layer_norm": fastattn.layer_norm,
            "attention": fastattn.scaled_dot_product_attention}[op]


@pytest.mark.parametrize("seed", range(80))
def test_fast_path_equals_general_path_bitwise(monkeypatch, seed):
    """Seeded random configurations: the fast path's output is bitwise the general path's
    (forced by an input that requires grad), and the fast path was taken."""
    op, args, kw = _random_case(random.Random(seed))
    with selector_calls(monkeypatch, forbid=True), torch.no_grad():
        fast = _public(op)(*args, **kw)
    general_args = (args[0].detach().clone().requires_grad_(True),) + args[1:]
    with selector_calls(monkeypatch) as calls:
        general = _public(op)(*general_args, **kw)
    assert calls == [op]
    assert fast.dtype == general.dtype and fast.shape == general.shape
    assert torch.equal(fast, general.detach()), (op, kw)


def _random_decode_case(rng):
    """A seeded rotary / rotary_qk / kvcache_attention / swiglu call (the ops whose fast path
    serves decoding): (op, public function, args, kwargs)."""
    dtype = rng.choice(DTYPES)
    op = rng.choice(["rotary", "rotary_qk", "kvcache_attention", "swiglu"])
    if op == "swiglu":          # one decode step's MLP activation, or a prefill's
        shape = rng.choice([(4, 1, 1376), (3, 7, 130), (2, 5)])
        gate = torch.randn(shape, dtype=dtype) * rng.choice([1.0, 30.0])
        up = torch.randn(shape[::-1], dtype=dtype).mT if rng.random() < 0.3 and len(shape) == 2 \
            else torch.randn(shape, dtype=dtype)
        return op, fastattn.swiglu, (gate, up), {}
    b, d = rng.randint(1, 3), rng.choice([8, 16, 24, 64])
    if op == "kvcache_attention":
        hkv, group = rng.randint(1, 3), rng.choice([1, 2, 4])
        sq, s_max = rng.choice([1, 1, 2, 5]), rng.randint(1, 90)
        q = torch.randn(b, sq, hkv * group, d, dtype=dtype) * rng.choice([1.0, 8.0])
        if rng.random() < 0.5:          # transformers' (B, Hkv, S, D) cache read in place
            k, v = (torch.randn(b, hkv, s_max, d, dtype=dtype).transpose(1, 2) for _ in range(2))
        else:
            k, v = (torch.randn(b, s_max, hkv, d, dtype=dtype) for _ in range(2))
        lens = rng.randint(0, s_max)
        if rng.random() < 0.4:
            lens = torch.tensor([rng.randint(0, s_max) for _ in range(b)], dtype=torch.int32)
        kw = dict(cache_seqlens=lens, is_causal=rng.random() < 0.7,
                  scale=rng.choice([None, 0.3]), softcap=rng.choice([0.0, 0.0, 5.0]))
        return op, fastattn.kvcache_attention, (q, k, v), kw
    s, cache_rows = rng.randint(1, 9), rng.randint(9, 40)
    rot = 2 * rng.randint(1, d // 2)
    cos, sin = fastattn.rotary_cache(cache_rows, rot)
    seq_dim = rng.choice([1, 2, -2, -3])
    seq = seq_dim % 4

    def tensor(heads):
        shape = [b, heads, heads, d]
        shape[seq] = s
        t = torch.randn(shape, dtype=dtype)
        return t.transpose(1, 2).contiguous().transpose(1, 2) if rng.random() < 0.3 else t
    positions = None
    if rng.random() < 0.7:
        rows = rng.choice([b, 1])
        positions = torch.randint(0, cache_rows, (rows, s),
                                  dtype=rng.choice([torch.int32, torch.int64]))
    kw = dict(interleaved=rng.random() < 0.3, seq_dim=seq_dim, positions=positions)
    if op == "rotary":
        return op, fastattn.apply_rotary, (tensor(rng.randint(1, 4)), cos, sin), kw
    def both(*a, **k):      # q and k compared as one tensor
        return torch.cat([t.flatten() for t in fastattn.apply_rotary_qk(*a, **k)])
    return op, both, (tensor(rng.randint(1, 4)), tensor(rng.randint(1, 4)), cos, sin), kw


@pytest.mark.parametrize("seed", range(80))
def test_decode_fast_paths_equal_general_path_bitwise(monkeypatch, seed):
    """Seeded random configurations of the rotary and KV-cache fast paths: bitwise the general
    path's output (forced by making the fast path decline), and the fast path was taken."""
    op, fn, args, kw = _random_decode_case(random.Random(seed))
    with selector_calls(monkeypatch, forbid=True), torch.no_grad():
        fast = fn(*args, **kw)
    from fastattn import _eager
    monkeypatch.setattr(_eager, op, lambda *a: None)
    with selector_calls(monkeypatch) as calls, torch.no_grad():
        general = fn(*args, **kw)
    assert calls == [LOGGED.get(op, op)]
    assert fast.dtype == general.dtype and fast.shape == general.shape
    # the same memory layout (a size-1 dim's stride is arbitrary)
    assert ([st for n, st in zip(fast.shape, fast.stride()) if n > 1]
            == [st for n, st in zip(general.shape, general.stride()) if n > 1]), (op, kw)
    assert torch.equal(fast, general), (op, kw)


@pytest.mark.parametrize("call", [
    lambda q, k: fastattn.kvcache_attention(q, k, k, cache_seqlens=41),
    lambda q, k: fastattn.kvcache_attention(q, k, k, cache_seqlens=-1),
    lambda q, k: fastattn.kvcache_attention(q, k, k, cache_seqlens=torch.tensor([41],
                                                                              dtype=torch.int32)),
    lambda q, k: fastattn.kvcache_attention(q, k, k, cache_seqlens=3, softcap=-1.0),
    lambda q, k: fastattn.kvcache_attention(q, k[..., :2, :], k, cache_seqlens=3),
    lambda q, k: fastattn.apply_rotary(q, COS, SIN, seq_dim=1, positions=torch.full((1, 1), 64)),
    lambda q, k: fastattn.apply_rotary(q[..., :8], COS, SIN, seq_dim=1),
    lambda q, k: fastattn.apply_rotary_qk(q, k, COS, SIN, seq_dim=1),
], ids=["kv-len-over", "kv-len-negative", "kv-len-tensor-over", "kv-softcap", "kv-shapes",
        "rotary-position", "rotary-width", "rotary-qk-shapes"])
def test_decode_fast_paths_leave_bad_input_to_the_general_path(call):
    """Bad input is declined by the fast path and gets the general path's ValueError."""
    q, k = torch.randn(1, 1, 4, 32), torch.randn(1, 40, 4, 32)
    with torch.no_grad(), pytest.raises(ValueError):
        call(q, k)


# ------------------------------------------------------------------ linear

def _random_linear_case(rng):
    """A seeded fastattn.linear call of a decode step: 1-16 rows as leading dims, Llama-sized
    and awkward features, strided views of input and weight, bias or not: (input, weight,
    bias)."""
    dtype = rng.choice(DTYPES)
    rows = rng.randint(1, LINEAR_MAX_ROWS[dtype])
    leads = [(rows,), (rows, 1), (1, rows)] + ([()] if rows == 1 else [])
    leads += [(2, rows // 2)] if rows % 2 == 0 else []
    lead = rng.choice(leads)
    k, n = rng.choice([1, 3, 17, 64, 512, 1376]), rng.choice([1, 3, 5, 130, 512])
    scale = rng.choice([1.0, 30.0])
    if rng.random() < 0.3 and lead:                 # a transposed view: column stride != 1
        x = torch.randn(k, *lead[::-1], dtype=dtype).permute(*range(len(lead), -1, -1))
    else:
        x = torch.randn(*lead, k, dtype=dtype)
    x = x * scale
    r = rng.random()
    if r < 0.3:                                     # w.t() of a (k, n) tensor
        w = torch.randn(k, n, dtype=dtype).t()
    elif r < 0.6:                                   # a row slice: row stride k + 8, offset 3
        w = torch.randn(n, k + 8, dtype=dtype)[:, 3:3 + k]
    else:
        w = torch.randn(n, k, dtype=dtype)
    w = w * k ** -0.5
    b = None
    if rng.random() < 0.5:
        b = torch.randn(n, dtype=dtype) if rng.random() < 0.5 else torch.randn(2 * n,
                                                                             dtype=dtype)[::2]
    return x, w, b


@pytest.mark.parametrize("seed", range(60))
def test_linear_fast_path_equals_general_path_bitwise(monkeypatch, seed):
    """Seeded random configurations of linear's fast path: bitwise the general path's output,
    both the op's body (the fast path made to decline) and the custom op (forced by a weight
    that requires grad), and the fast path was taken."""
    x, w, b = _random_linear_case(random.Random(seed))
    with selector_calls(monkeypatch, forbid=True), fastattn.record_dispatch() as log, \
            torch.no_grad():
        fast = fastattn.linear(x, w, b)
    assert log == [("linear", "cpu")]
    with selector_calls(monkeypatch) as calls:
        through_op = fastattn.linear(x, w.detach().requires_grad_(), b)
    assert calls == ["linear"]
    from fastattn import _eager
    monkeypatch.setattr(_eager, "linear", lambda *a: None)
    with selector_calls(monkeypatch) as calls, fastattn.record_dispatch() as log, \
            torch.no_grad():
        general = fastattn.linear(x, w, b)
    assert calls == ["linear"] and log == [("linear", "cpu")]
    cfg = (tuple(x.shape), x.stride(), tuple(w.shape), w.stride(), b is not None, x.dtype)
    for other in (general, through_op.detach()):
        assert fast.dtype == other.dtype and fast.shape == other.shape, cfg
        assert fast.stride() == other.stride(), cfg
        assert torch.equal(fast, other), cfg


# The cpu kernel's row limits (fastattn/_C_ops.py's LINEAR_MAX_ROWS, csrc/eager.cpp's
# linear_max_rows).
LINEAR_MAX_ROWS = {torch.float32: 16, torch.float16: 8, torch.bfloat16: 4}


def _limit_leads():
    """(dtype, leading dims) at and one past each dtype's row limit, in several shapes."""
    out = []
    for dtype, n in LINEAR_MAX_ROWS.items():
        out += [(dtype, (n,)), (dtype, (2, n // 2)), (dtype, (n // 2, 1, 2)), (dtype, (n + 1,)),
                (dtype, (n + 1, 1)), (dtype, (1, n + 1))]
    return out


@pytest.mark.parametrize("dtype,lead", _limit_leads(),
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_linear_row_limit_is_the_same_on_both_paths(monkeypatch, dtype, lead):
    """csrc/eager.cpp's linear_max_rows is fastattn/_C_ops.py's LINEAR_MAX_ROWS (16 fp32, 8
    fp16, 4 bf16): at the limit the fast path runs the kernel without asking the general
    path; one row more it declines, and auto's selector gives the call to the torch backend
    (an explicit cpu backend refuses it). Were the C++ limit higher, limit + 1 rows would skip
    the selector; lower, the limit would call it."""
    from fastattn import _C_ops
    assert _C_ops.LINEAR_MAX_ROWS == LINEAR_MAX_ROWS
    rows, limit = torch.Size(lead).numel(), LINEAR_MAX_ROWS[dtype]
    x, w, b = (torch.randn(*lead, 24).to(dtype), torch.randn(6, 24).to(dtype),
               torch.randn(6).to(dtype))
    for backend in ("auto", "cpu"):
        with fastattn.use_backend(backend), torch.no_grad():
            if rows <= limit:
                with selector_calls(monkeypatch, forbid=True), \
                        fastattn.record_dispatch() as log:
                    y = fastattn.linear(x, w, b)
                assert log == [("linear", "cpu")]
                torch.testing.assert_close(y, F.linear(x, w, b))
            elif backend == "auto":
                with selector_calls(monkeypatch) as calls, fastattn.record_dispatch() as log:
                    y = fastattn.linear(x, w, b)
                assert calls == ["linear"] and log == [("linear", "torch")]
                assert torch.equal(y, F.linear(x, w, b))
            else:
                with selector_calls(monkeypatch) as calls, \
                        pytest.raises(RuntimeError, match=f"more than {limit} rows"):
                    fastattn.linear(x, w, b)
                assert calls == ["linear"]


def test_linear_parameters_take_the_fast_path_without_grad(monkeypatch):
    """nn.Linear's parameters: under no_grad (a decode step) the fast path takes them; with
    autograd on they need gradients (the general path, which delivers them), as does a bias
    alone that requires grad."""
    lin = torch.nn.Linear(48, 5)
    x = torch.randn(3, 48)
    with selector_calls(monkeypatch, forbid=True), torch.no_grad():
        fast = fastattn.linear(x, lin.weight, lin.bias)
    with selector_calls(monkeypatch) as calls:
        y = fastattn.linear(x, lin.weight, lin.bias)
    assert calls == ["linear"] and y.requires_grad
    y.sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None
    assert torch.equal(fast, y.detach())
    with selector_calls(monkeypatch) as calls:
        fastattn.linear(x, LIN_W, torch.randn(5, requires_grad=True))
    assert calls == ["linear"]


def test_linear_declines_what_the_kernel_does_not_take(monkeypatch):
    """float64, rows 0 and in_features 0 go through the general path (auto: the torch backend
    for float64, the cpu op for empty inputs)."""
    cases = [(torch.randn(3, 8).double(), torch.randn(5, 8).double(), "torch"),
             (torch.randn(0, 8), torch.randn(5, 8), "cpu"),
             (torch.randn(3, 0), torch.randn(5, 0), "cpu")]
    for x, w, backend in cases:
        with selector_calls(monkeypatch) as calls, fastattn.record_dispatch() as log, \
                torch.no_grad():
            y = fastattn.linear(x, w)
        assert calls == ["linear"] and log == [("linear", backend)]
        assert torch.equal(y, F.linear(x, w))


def test_fast_path_results_match_pytorch():
    """The fast path's answers against PyTorch's own ops (fp32, tight)."""
    q, k, v, x, w = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fastattn.softmax(x, -1), torch.softmax(x, -1))
        torch.testing.assert_close(fastattn.rms_norm(x, (48,), w), F.rms_norm(x, (48,), w))
        torch.testing.assert_close(fastattn.layer_norm(x, (48,), w, w),
                                   F.layer_norm(x, (48,), w, w))
        torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v),
                                   F.scaled_dot_product_attention(q, k, v))
        torch.testing.assert_close(fastattn.linear(x, LIN_W, LIN_B), F.linear(x, LIN_W, LIN_B))


def test_without_the_extension_every_function_declines():
    """fastattn/_eager.py's fallbacks (fastattn._C missing) return None, and the public
    functions then run on the torch backend (a fresh process: the extension cannot be
    unloaded)."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['fastattn._C'] = None\n"
        "import torch, fastattn\n"
        "from fastattn import _eager\n"
        "x = torch.randn(2, 4)\n"
        "assert _eager.softmax(x, -1, None, False) is None\n"
        "assert _eager.rms_norm(x, 4, None, None) is None\n"
        "assert _eager.layer_norm(x, 4, None, None, 1e-5) is None\n"
        "assert _eager.attention(x, x, x, 0.0, False, None, False) is None\n"
        "assert _eager.rotary(x, x, x, False, 1, None) is None\n"
        "assert _eager.rotary_qk(x, x, x, x, False, 1, None) is None\n"
        "assert _eager.kvcache_attention(x, x, x, 1, None, True, 0.0) is None\n"
        "assert _eager.swiglu(x, x) is None\n"
        "assert _eager.linear(x, x, None) is None\n"
        "with fastattn.record_dispatch() as calls, torch.no_grad():\n"
        "    y = fastattn.softmax(x, -1)\n"
        "    z = fastattn.linear(x, x)\n"
        "assert calls == [('softmax', 'torch'), ('linear', 'torch')], calls\n"
        "assert torch.allclose(y, torch.softmax(x, -1))\n"
        "assert torch.allclose(z, x @ x.T)\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
