"""torch.compile(fullgraph=True) on CPU: a block built from fastattn's modules and each public
function trace without graph breaks and give the eager result (forward and backward)."""

import pytest
import torch
import torch.nn as nn

import fastattn
from tolerances import COMPOSED_FP32_GRAD_TOL, COMPOSED_FP32_TOL



@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    """Pre-norm transformer block on fastattn modules (rotary + GQA attention)."""

    def __init__(self, e=32, h=4):
        super().__init__()
        self.norm1 = fastattn.LayerNorm(e)
        self.attn = fastattn.MultiHeadAttention(e, h, batch_first=True, rotary=True,
                                                num_kv_heads=2)
        self.norm2 = fastattn.RMSNorm(e)
        self.mlp = nn.Linear(e, e)

    def forward(self, x, mask, kpm):
        h = self.norm1(x)
        a, w = self.attn(h, h, h, attn_mask=mask, key_padding_mask=kpm, is_causal=True)
        x = x + a
        return x + self.mlp(self.norm2(x)), w


def eager_and_compiled(fn, *inputs):
    """Outputs and input gradients of fn eagerly and compiled with fullgraph=True."""
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
              else t for t in inputs]
        out = f(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum()
                   for o in outs if o is not None)
        leaves = [t for t in xs if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(loss, leaves) if leaves else ()
        results.append((outs, grads))
    return results


def assert_same(results):
    (eo, eg), (co, cg) = results
    for a, b in zip(co + cg, eo + eg):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, **COMPOSED_FP32_TOL)


@pytest.mark.parametrize("with_kpm", [False, True])
def test_block_compiles_fullgraph(with_kpm):
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 12, 32, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(12)
    kpm = None
    if with_kpm:
        kpm = torch.zeros(2, 12, dtype=torch.bool)
        kpm[1, 9:] = True
    eager = block(x, mask, kpm)
    compiled = torch.compile(block, fullgraph=True)
    got = compiled(x, mask, kpm)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, **COMPOSED_FP32_TOL)
    # backward through the compiled graph, parameters included
    ge = torch.autograd.grad(eager[0].sum() + eager[1].square().sum(),
                             [x] + list(block.parameters()))
    gc = torch.autograd.grad(got[0].sum() + got[1].square().sum(),
                             [x] + list(block.parameters()))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, **COMPOSED_FP32_GRAD_TOL)


def test_mha_drop_in_compiles_need_weights_false():
    torch.manual_seed(0)
    m = fastattn.MultiHeadAttention(32, 4)
    x = torch.randn(10, 2, 32)
    mask = torch.randn(10, 10)
    f = lambda q: m(q, q, q, attn_mask=mask, need_weights=False)[0]     # noqa: E731
    assert_same(eager_and_compiled(f, x.requires_grad_()))


def test_public_functions_compile_fullgraph():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 9, 16, requires_grad=True)
    k = torch.randn(1, 2, 9, 16, requires_grad=True)
    v = torch.randn(1, 2, 9, 16, requires_grad=True)
    assert_same(eager_and_compiled(
        lambda a, b, c: fastattn.scaled_dot_product_attention(a, b, c, is_causal=True),
        q, k, v))
    x = torch.randn(4, 33, requires_grad=True)
    assert_same(eager_and_compiled(lambda t: fastattn.softmax(t, dim=-1), x))
    w, b = torch.randn(33, requires_grad=True), torch.randn(33, requires_grad=True)
    assert_same(eager_and_compiled(lambda t, ww, bb: fastattn.layer_norm(t, (33,), ww, bb),
                                   x, w, b))
    assert_same(eager_and_compiled(lambda t, ww: fastattn.rms_norm(t, (33,), ww), x, w))
    assert_same(eager_and_compiled(fastattn.swiglu, x, torch.randn(4, 33, requires_grad=True)))
    cos, sin = fastattn.rotary_cache(9, 16)
    assert_same(eager_and_compiled(lambda t: fastattn.apply_rotary(t, cos, sin), q))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_inplace_rotary_with_offsets_compiles_fullgraph(backend):
    """apply_rotary(inplace=True) with per-batch offsets traces without a graph break (its
    overlap and offset checks need no host sync or storage address under compile) and writes
    the same values into x as eagerly: a 4-D x rotated in place, a 5-D x whose head dims merge
    (rotated through a view) and one whose head dims do not (rotated in a copy, written back)."""
    cos, sin = fastattn.rotary_cache(16, 8)
    offsets = torch.tensor([0, 5])

    def rotate(x):
        fastattn.apply_rotary(x, cos, sin, seq_dim=1, offsets=offsets, inplace=True)
        return x + 0

    g = torch.Generator().manual_seed(3)
    shapes = {
        "4d": lambda: torch.randn(2, 7, 3, 16, generator=g),
        "5d_merged": lambda: torch.randn(2, 7, 2, 3, 16, generator=g),
        "5d_copied": lambda: torch.randn(2, 7, 3, 2, 16, generator=g).transpose(2, 3),
    }
    for name, make in shapes.items():
        torch._dynamo.reset()
        want = make()
        got, before = want.clone(), want.clone()
        with fastattn.use_backend(backend):
            rotate(want)
            out = torch.compile(rotate, fullgraph=True, backend="aot_eager")(got)
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
        torch.testing.assert_close(out, want, atol=0, rtol=0, msg=name)
        assert not torch.equal(got, before), name


def test_mha_training_with_dropout_and_weights_compiles():
    """Dropout in training with need_weights=True traces fullgraph; the returned dropped
    weights are the ones the output was computed with."""
    torch.manual_seed(0)
    m = fastattn.MultiHeadAttention(32, 4, dropout=0.3, batch_first=True)
    x = torch.randn(2, 10, 32, requires_grad=True)
    f = torch.compile(lambda t: m(t, t, t, average_attn_weights=False), fullgraph=True,
                      backend="aot_eager")
    out, w = f(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    with torch.no_grad():
        _, _, v = m._project(x, x, x, True)
        expected = m.out_proj((w @ v).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(out, expected, **COMPOSED_FP32_TOL)
    assert 0.15 < (w == 0).float().mean().item() < 0.45


# ------------------------------------------------------------------ backend choice under compile

class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it (one per (re)compile)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_changing_backend_recompiles_and_dispatch_is_recorded():
    """Issue #12 item 6: a function compiled under use_backend("torch") must run the cpu
    backend under use_backend("cpu") (a guarded recompile, not the frozen first choice), and
    record_dispatch() must see the calls the compiled code makes."""
    counting = CountingBackend()
    f = torch.compile(lambda t: fastattn.softmax(t, dim=-1) * 2, fullgraph=True,
                      backend=counting)
    x = torch.randn(3, 17)
    expected = torch.softmax(x, dim=-1) * 2
    seen = []
    for name in ("torch", "cpu", "torch", "cpu"):
        with fastattn.use_backend(name), fastattn.record_dispatch() as calls:
            out = f(x)
        torch.testing.assert_close(out, expected, **COMPOSED_FP32_TOL)
        seen.append((name, calls, counting.graphs))
    assert [calls for _, calls, _ in seen] == [[("softmax", "torch")], [("softmax", "cpu")],
                                               [("softmax", "torch")], [("softmax", "cpu")]]
    # one graph per backend; going back to a backend reuses its graph
    assert [graphs for _, _, graphs in seen] == [1, 2, 2, 2]


def test_dispatch_recorded_in_compiled_forward_and_backward_graphs():
    """record_dispatch() logs each forward kernel call as it runs in a compiled (aot_eager)
    graph, every call, not once at trace time; backward kernels are not logged."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 6, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    cos, sin = fastattn.rotary_cache(6, 16)

    def block(t, ww):
        h = fastattn.rms_norm(t, (16,), ww)
        h = fastattn.layer_norm(h, (16,))
        return fastattn.apply_rotary(h, cos, sin)

    f = torch.compile(block, fullgraph=True, backend="aot_eager")
    with fastattn.use_backend("cpu"):
        for _ in range(2):
            with fastattn.record_dispatch() as calls:
                f(x, w).sum().backward()
            assert calls == [("rms_norm", "cpu"), ("layer_norm", "cpu"), ("rotary", "cpu")]
        with fastattn.record_dispatch() as eager_calls:
            block(x, w).sum().backward()
    assert eager_calls == calls


def test_env_var_is_read_when_tracing_and_use_backend_overrides_it(monkeypatch):
    """What holds for $FASTATTN_BACKEND under torch.compile (documented in fastattn/_backend.py
    select()): it is read when the function is traced; use_backend() overrides it and is
    guarded."""
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    f = torch.compile(lambda t: fastattn.softmax(t), fullgraph=True, backend="eager")
    x = torch.randn(2, 9)
    with fastattn.record_dispatch() as calls:
        f(x)
    assert calls == [("softmax", "torch")]
    with fastattn.use_backend("cpu"), fastattn.record_dispatch() as calls:
        f(x)
    assert calls == [("softmax", "cpu")]


def test_mha_with_weights_follows_the_backend_when_compiled():
    """The attention and the attention-weights op of a compiled MultiHeadAttention both follow
    use_backend() (the weights op has its own selection, guarded the same way)."""
    torch.manual_seed(0)
    m = fastattn.MultiHeadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    f = torch.compile(lambda t: m(t, t, t, need_weights=True), fullgraph=True,
                      backend="aot_eager")
    with torch.no_grad():
        eager = m(x, x, x, need_weights=True)
        for name in ("torch", "cpu", "torch"):
            with fastattn.use_backend(name), fastattn.record_dispatch() as calls:
                out, w = f(x)
            assert calls == [("attention", name), ("attention_weights", name)], (name, calls)
            torch.testing.assert_close(out, eager[0], **COMPOSED_FP32_TOL)
            torch.testing.assert_close(w, eager[1], **COMPOSED_FP32_TOL)


def test_sizes_that_change_between_calls_stay_dynamic():
    """A size that changes between calls of a compiled function becomes a SymInt (automatic
    dynamic shapes). It once reached the backend selector, which takes trace-time constants
    only, so fullgraph=True raised (sequence lengths for attention, row lengths for softmax and
    the norms). Now four sizes compile to two graphs (the first static, then one dynamic)
    without a graph break, and every call gives the eager result."""
    import torch._dynamo.testing
    eps = torch.finfo(torch.float32).eps
    cases = {
        "softmax": (lambda x: fastattn.softmax(x, -1), lambda n: (torch.randn(3, n),)),
        "layer_norm": (lambda x, w: fastattn.layer_norm(x, (x.shape[-1],), w),
                       lambda n: (torch.randn(3, n), torch.randn(n))),
        "rms_norm": (lambda x, w: fastattn.rms_norm(x, (x.shape[-1],), w, eps),
                     lambda n: (torch.randn(3, n), torch.randn(n))),
        "sdpa": (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                 lambda n: tuple(torch.randn(2, 4, n, 16) for _ in range(3))),
        # rows 2..11: all on one side of the cpu kernel's 16-row limit (crossing it recompiles,
        # a guard on rows <= 16)
        "linear": (lambda x, w: fastattn.linear(x, w), lambda n: (torch.randn(n - 6, 8),
                                                               torch.randn(5, 8))),
    }
    for name, (fn, make) in cases.items():
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        compiled = torch.compile(fn, fullgraph=True, backend=counter)
        for n in (8, 9, 12, 17):
            args = make(n)
            torch.testing.assert_close(compiled(*args), fn(*args), **COMPOSED_FP32_TOL,
                                       msg=lambda m: f"{name} n={n}: {m}")
        assert counter.frame_count == 2, (name, counter.frame_count)
