"""fastattn.linear (F.linear) on the cpu, torch and auto backends against the fp64 reference:
the output and the gradients of input, weight and bias, awkward sizes, strided views, empty
tensors; which backend runs (the cpu kernel takes at most 16 rows), errors, torch.compile and
opcheck.

Bounds (tests/tolerances.py): fp32 within the dot-product bound of its k terms, elementwise
(dot_fp32_bound: outputs are sums of in_features products, input gradients sums of
out_features, weight and bias gradients sums over the rows); fp16/bf16 the 2x rule against
F.linear in the dtype. The triton backend has no linear kernel (kernels/linear.py): it is not
in BACKENDS, and test_triton_backend_refuses_linear checks that it says so.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_dot_fp32, assert_within_2x

import fastattn
from fastattn import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["cpu", "torch", "auto"]
# The most rows (product of input's leading dims) the cpu kernel takes, per dtype
# (fastattn.linear's docstring); auto gives more to the torch backend.
MAX_ROWS = {torch.float32: 16, torch.float16: 8, torch.bfloat16: 4}


def max_rows(dtype):
    return MAX_ROWS.get(dtype, 0)


def refused_by_cpu(backend, rows, dtype, x, w, b=None):
    """True (after checking the error) when the explicitly chosen cpu backend must refuse the
    call: more rows than its kernel takes for the dtype."""
    if backend != "cpu" or rows <= max_rows(dtype):
        return False
    with pytest.raises(RuntimeError, match=r"cpu.*more than \d+ rows.*use backend 'auto'"):
        fastattn.linear(x, w, b)
    return True


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test inside fastattn.use_backend(name) for each backend that has a linear."""
    with fastattn.use_backend(request.param):
        yield request.param


def expected_backend(backend, rows, dtype=torch.float32):
    if backend != "auto":
        return backend
    return "cpu" if rows <= max_rows(dtype) else "torch"


def rand(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def check_linear(x, w, b=None, seed=7):
    """fastattn.linear(x, w, b) on the tensors as given (detach() keeps a view's strides)
    against the fp64 reference and F.linear in the input dtype, output and the three
    gradients; returns record_dispatch()'s log."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    for t, leaf in zip((x, w, b), leaves):
        assert t is None or leaf.stride() == t.stride()
    with fastattn.record_dispatch() as calls:
        y = fastattn.linear(*leaves)
    out_shape = (*x.shape[:-1], w.shape[0])
    assert y.dtype == x.dtype and tuple(y.shape) == out_shape and y.device == x.device

    def run(dtype):       # on contiguous copies (F.linear in bf16 reads gaps between rows)
        ins = [t.detach().to(dtype).contiguous().requires_grad_() if t is not None else None
               for t in (x, w, b)]
        return (reference.linear(*ins) if dtype == torch.float64 else F.linear(*ins)), ins

    ref, ref_in = run(torch.float64)
    pt, pt_in = run(x.dtype)
    k, n = x.shape[-1], w.shape[0]
    x2 = x.detach().double().reshape(-1, k)                          # (rows, k)
    w64 = w.detach().double()                                        # (n, k)
    if x.dtype == torch.float32:
        terms = x2.abs() @ w64.abs().T                               # (rows, n)
        if b is not None:
            terms = terms + b.detach().double().abs()
        assert_dot_fp32(y, ref, terms.reshape(out_shape), k, name="y")
    else:
        assert_within_2x(y, ref, pt, name="y")
    if y.numel() == 0:
        return calls
    dy = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    wanted = [t for t in leaves if t is not None]
    ours = torch.autograd.grad(y, wanted, dy)
    theirs = torch.autograd.grad(ref, [t for t in ref_in if t is not None], dy.double())
    lowp = torch.autograd.grad(pt, [t for t in pt_in if t is not None], dy)
    dy2 = dy.double().abs().reshape(-1, n)                           # (rows, n)
    rows = dy2.shape[0]
    # (name, k of the sums, their terms): dx = dy @ w, dw = dy^T @ x, db = sum of dy's rows
    sums = [("dinput", n, (dy2 @ w64.abs()).reshape(x.shape)),
            ("dweight", rows, dy2.T @ x2.abs()),
            ("dbias", rows, dy2.sum(0))]
    for (name, kk, t), a, r, p in zip(sums, ours, theirs, lowp):
        assert a.dtype == x.dtype and a.shape == r.shape, name
        if x.dtype == torch.float32:
            assert_dot_fp32(a, r, t, kk, name=name)
        else:
            assert_within_2x(a, r, p, name=name)
    return calls


# Leading dims of the input: rows 1..16 (1-D input, (B, S, K), (B, 1, K), S = 1 decode steps).
LEADS = [(), (1,), (3,), (4,), (5,), (7,), (8,), (16,), (2, 1), (2, 3), (4, 1, 1), (3, 1, 5),
         (2, 2, 4)]
# (in_features, out_features, bias): k odd and small, not a multiple of 16, large; n not a
# multiple of 4 (the kernel's column blocks) and 1.
SIZES = [(1, 1, True), (3, 2, False), (17, 3, True), (100, 5, False), (1000, 130, True),
         (1376, 7, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"k{s[0]}-n{s[1]}-{'b' if s[2] else 'nob'}")
@pytest.mark.parametrize("lead", LEADS, ids=lambda s: "x".join(map(str, s)) or "1d")
def test_sizes(backend, dtype, size, lead):
    k, n, bias = size
    x = rand(*lead, k, seed=1, dtype=dtype)
    w = rand(n, k, seed=2, scale=k ** -0.5, dtype=dtype)
    b = rand(n, seed=3, dtype=dtype) if bias else None
    rows = torch.Size(lead).numel()
    if refused_by_cpu(backend, rows, dtype, x, w, b):
        return
    calls = check_linear(x, w, b)
    assert calls == [("linear", expected_backend(backend, rows, dtype))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 130, 512])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 8, 9, 16])
def test_rows_by_out_features(backend, dtype, n, rows):
    """Every row count up to the kernel's limit (its 4-row passes and their tails) against
    every column-block tail (blocks of 4 weight rows), K = 1376 (a multiple of 16) and 33."""
    for k in (1376, 33):
        x, w = rand(rows, k, seed=rows, dtype=dtype), rand(n, k, seed=n, scale=k ** -0.5,
                                                           dtype=dtype)
        b = rand(n, seed=5, dtype=dtype)
        if not refused_by_cpu(backend, rows, dtype, x, w, b):
            check_linear(x, w, b)


def nan_padded(t, view):
    """A view `view(storage)` of a NaN-filled storage holding t's values: whatever a kernel
    reads outside the view is NaN and shows in its output."""
    storage = torch.full(t.shape if view is None else view[0], float("nan"), dtype=t.dtype)
    v = view[1](storage)
    assert v.shape == t.shape
    v.copy_(t)
    return v


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(backend, dtype):
    """Views whose storage around them is NaN (a read outside the view shows). 6 rows (4 in
    bf16, the kernel's limit there)."""
    k, n, r = 37, 11, min(6, max_rows(dtype))
    xv = rand(r, k, seed=1, dtype=dtype)
    wv = rand(n, k, seed=2, scale=0.2, dtype=dtype)
    # input: a transposed view (column stride 7), a column-strided slice, a row of a 3-D
    # tensor (row stride 3k), a row slice (row stride k + 9, offset 4), an expanded row
    xs = [nan_padded(xv, ((k, r + 1), lambda s: s[:, 1:r + 1].t())),
          nan_padded(xv, ((r, 2 * k), lambda s: s[:, ::2])),
          nan_padded(xv.view(2, r // 2, k), ((2, r // 2, 3, k), lambda s: s[:, :, 1])),
          nan_padded(xv, ((r, k + 9), lambda s: s[:, 4:4 + k])),
          rand(1, k, seed=4, dtype=dtype).expand(r, k)]
    # weight: a row slice with row stride > k and an offset, every other row, w.t() of a
    # (k, n) tensor (column stride n + 2), an expanded row (row stride 0)
    ws = [nan_padded(wv, ((n, k + 9), lambda s: s[:, 4:4 + k])),
          nan_padded(wv, ((2 * n, k), lambda s: s[::2])),
          nan_padded(wv, ((k, n + 2), lambda s: s[:, 1:n + 1].t())),
          rand(1, k, seed=8, scale=0.2, dtype=dtype).expand(n, k)]
    b = nan_padded(rand(n, seed=9, dtype=dtype), ((2 * n,), lambda s: s[::2]))
    for x in xs:
        assert not x.is_contiguous()
        for w in ws:
            assert not w.is_contiguous()
            check_linear(x, w, b)
            check_linear(x, w)


@pytest.mark.parametrize("rows", [17, 20, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_ignores_gaps_between_rows(dtype, rows):
    """More than 16 rows (the torch backend under auto) of an input with gaps between its rows
    that hold NaN: ATen's bf16 GEMM read the gaps (NaN outputs; fastattn/_torch_backend.py
    copies such an input first)."""
    for backend in ("auto", "torch"):
        with fastattn.use_backend(backend):
            x = nan_padded(rand(rows, 213, seed=rows, dtype=dtype),
                           ((rows, 426), lambda s: s[:, :213]))
            calls = check_linear(x, rand(100, 213, seed=1, scale=0.07, dtype=dtype))
            assert calls == [("linear", "torch")]
            x3 = nan_padded(rand(rows, 1, 3, seed=rows, dtype=dtype),
                            ((rows, 1, 6), lambda s: s[..., :3]))
            check_linear(x3, rand(197, 3, seed=2, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_contiguous_input_strided_weight_large(backend, dtype):
    """A decode step's shapes on strided weights: (1376, 512) read through w.t() of a
    (512, 1376) tensor and a row slice of a wider one."""
    x = rand(4, 1, 512, seed=1, dtype=dtype)
    check_linear(x, rand(512, 1376, seed=2, scale=0.05, dtype=dtype).t())
    check_linear(x, rand(1376, 600, seed=3, scale=0.05, dtype=dtype)[:, 40:552],
                 rand(1376, seed=4, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_and_tiny_magnitudes(backend, dtype):
    """Inputs up to ~1e4 (fp16: up to ~4e3 against weights ~1e-2, the products well inside
    its range) and tiny ones (fp16: its smallest normals; fp32/bf16: 1e-30 against weights of
    1, products far from fp32's subnormals). 5 rows (4 in bf16, the kernel's limit there)."""
    if dtype == torch.float16:
        big, small = (1e3, 1e-2), (1e-4, 1e-2)
    else:
        big, small = (1e4, 1e4), (1e-30, 1.0)
    for (xs, ws) in (big, small):
        for k, n in ((1376, 7), (17, 130)):
            check_linear(rand(min(5, max_rows(dtype)), k, seed=1, scale=xs, dtype=dtype),
                         rand(n, k, seed=2, scale=ws, dtype=dtype),
                         rand(n, seed=3, scale=xs * ws, dtype=dtype))


@pytest.mark.parametrize("shape", [(0, 9), (2, 0, 9), (3, 0), (2, 3, 0), (0, 0)],
                         ids=["rows0", "rows0-3d", "k0", "k0-3d", "rows0-k0"])
@pytest.mark.parametrize("n", [5, 0])
@pytest.mark.parametrize("bias", [False, True])
def test_empty(backend, shape, n, bias):
    """Rows 0, out_features 0, in_features 0 (F.linear: the output is the bias, or zeros; the
    bias gradient is dy summed over the rows, the others empty or zeros), exactly."""
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(n, shape[-1], requires_grad=True)
    b = torch.randn(n, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    y = fastattn.linear(x, w, b)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = F.linear(*ref_leaves) if bias else F.linear(*ref_leaves, None)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.equal(y.detach(), ref.detach())
    dy = torch.randn(y.shape)
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy, allow_unused=True)
    for leaf, g, r in zip(leaves, grads, ref_grads):
        g = torch.zeros_like(leaf) if g is None else g        # unused: a zero gradient
        r = torch.zeros_like(leaf) if r is None else r
        assert g.shape == leaf.shape and torch.equal(g, r)


def test_no_grad_call_matches_the_grad_call(backend):
    """The direct call (the C++ fast path or the op's body, no autograd) and the custom op
    compute bitwise the same output."""
    x, w, b = rand(2, 3, 40, seed=1), rand(9, 40, seed=2), rand(9, seed=3)
    with torch.no_grad():
        a = fastattn.linear(x, w, b)
    g = fastattn.linear(x, w.clone().requires_grad_(), b)
    assert torch.equal(a, g.detach())


def test_float64_runs_on_the_torch_backend():
    x = rand(4, 9, seed=12, dtype=torch.float64).requires_grad_()
    w = rand(3, 9, seed=13, dtype=torch.float64).requires_grad_()
    b = rand(3, seed=14, dtype=torch.float64).requires_grad_()
    with fastattn.record_dispatch() as calls:
        y = fastattn.linear(x, w, b)
    assert calls == [("linear", "torch")]
    torch.testing.assert_close(y, F.linear(x, w, b))
    assert torch.autograd.gradcheck(fastattn.linear, (x, w, b))
    with fastattn.use_backend("cpu"), pytest.raises(RuntimeError, match="float64"):
        fastattn.linear(x.detach(), w.detach())


# ------------------------------------------------------------------ which backend runs

@pytest.mark.parametrize("lead", [(1,), (3,), (16,), (4, 4), (2, 1, 8), (17,), (17, 1),
                                  (1, 17), (3, 7), (64,)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("grad", [False, True])
def test_auto_gives_the_cpu_kernel_at_most_16_rows(lead, grad):
    """auto: rows (the product of the leading dims) <= 16 run the cpu kernel, more the torch
    backend (ATen's GEMM), with or without autograd."""
    from fastattn import _backend
    if _backend.unavailable_reason("cpu", "cpu") is not None:
        pytest.fail("the cpu backend must be built for the tests")
    rows = torch.Size(lead).numel()
    x = torch.randn(*lead, 24, requires_grad=grad)
    w, b = torch.randn(6, 24), torch.randn(6)
    with fastattn.use_backend("auto"), fastattn.record_dispatch() as calls:
        y = fastattn.linear(x, w, b)
    assert calls == [("linear", expected_backend("auto", rows))]
    torch.testing.assert_close(y, F.linear(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_row_limit_per_dtype(dtype):
    """The kernel's limit depends on the dtype (fp16/bf16 weights are widened on every row
    pass, where ATen's bf16 GEMM has AMX): 16 rows fp32, 8 fp16, 4 bf16 run on cpu, one more
    on torch."""
    w = torch.randn(6, 24).to(dtype)
    limit = max_rows(dtype)
    for rows, want in ((limit, "cpu"), (limit + 1, "torch")):
        for grad in (False, True):
            x = torch.randn(rows, 24).to(dtype).requires_grad_(grad)
            with fastattn.record_dispatch() as calls:
                fastattn.linear(x, w)
            assert calls == [("linear", want)], (dtype, rows, grad)


@pytest.mark.parametrize("lead", [(17,), (2, 9), (17, 1), (100,)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("grad", [False, True])
def test_cpu_backend_refuses_more_than_16_rows(lead, grad):
    x = torch.randn(*lead, 24, requires_grad=grad)
    w = torch.randn(6, 24)
    with fastattn.use_backend("cpu"):
        with pytest.raises(RuntimeError, match=r"cpu.*more than 16 rows.*use backend 'auto'"):
            fastattn.linear(x, w)
        with torch.no_grad(), pytest.raises(RuntimeError, match="more than 16 rows"):
            fastattn.linear(x, w)
        fastattn.linear(x.reshape(-1, 24)[:16], w)                  # 16 rows: runs


def test_triton_backend_refuses_linear():
    """No Triton linear kernel: under the interpreter the triton backend runs CPU tensors but
    refuses linear; without it (and without a GPU) the backend itself is unavailable. Either
    way a RuntimeError, as every op gives for a backend that cannot run it. (The environment
    is read here, not through the code under test, as tests/test_backend.py does.)"""
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    from fastattn.kernels import linear as triton_linear
    assert "no Triton linear kernel" in triton_linear.unsupported("linear", rows=2)
    if os.environ.get("TRITON_INTERPRET") == "1":
        with fastattn.use_backend("triton"):
            with pytest.raises(RuntimeError, match="no Triton linear kernel.*use backend 'auto'"):
                fastattn.linear(x, w)
            with torch.no_grad(), pytest.raises(RuntimeError, match="no Triton linear kernel"):
                fastattn.linear(x, w)
    elif not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'triton' is unavailable"):
            with fastattn.use_backend("triton"):
                fastattn.linear(x, w)
    else:                                   # a GPU: triton runs CUDA tensors, not CPU ones
        with fastattn.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
            fastattn.linear(x, w)


def test_no_backend_but_torch_takes_cuda_tensors():
    """The CPU side of the GPU test below: for CUDA tensors both kernel backends decline
    linear with a reason (so `auto`'s order triton, cuda, torch ends on torch), whatever the
    row count."""
    from fastattn import _C_ops
    from fastattn.kernels import linear as triton_linear
    for rows in (1, 4, 17):
        case = dict(dtype=torch.float32, device="cuda", rows=rows)
        assert "no Triton linear kernel" in triton_linear.unsupported("linear", **case)
        assert _C_ops.unsupported("linear", **case) is not None
        cpu_reason = _C_ops.unsupported("linear", **{**case, "device": "cpu"})
        assert (cpu_reason is None) == (rows <= 16), cpu_reason     # the CPU tensors' limit


@pytest.mark.gpu
def test_cuda_tensors_run_on_the_torch_backend():
    """No CUDA linear kernel: auto gives CUDA tensors to the torch backend (cuBLAS)."""
    x, w, b = (t.cuda() for t in (torch.randn(3, 64), torch.randn(5, 64), torch.randn(5)))
    with fastattn.record_dispatch() as calls:
        y = fastattn.linear(x, w, b)
    assert calls == [("linear", "torch")]
    torch.testing.assert_close(y, F.linear(x, w, b))


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("grad", [False, True])
def test_bad_input(grad):
    """Each error names the argument (the fast path declines bad input: the same errors with
    and without autograd)."""
    x = torch.randn(3, 4, requires_grad=grad)
    w, b = torch.randn(5, 4), torch.randn(5)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        fastattn.linear([1.0, 2.0, 3.0, 4.0], w)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        fastattn.linear(x, [[1.0] * 4])
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        fastattn.linear(x, w, [0.0] * 5)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        fastattn.linear(x, torch.randn(4))
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        fastattn.linear(x, torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match=r"weight must have shape \(out_features, 4\)"):
        fastattn.linear(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        fastattn.linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        fastattn.linear(x, w, torch.randn(1, 5))
    with pytest.raises(ValueError, match="weight has dtype torch.float16 but input has"):
        fastattn.linear(x, w.half())
    with pytest.raises(ValueError, match="bias has dtype torch.bfloat16 but input has"):
        fastattn.linear(x, w, b.bfloat16())
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        fastattn.linear(x, torch.empty(5, 4, device="meta"))
    with pytest.raises(ValueError, match="input must have at least 1 dimension"):
        fastattn.linear(torch.tensor(1.0, requires_grad=grad), torch.randn(5, 1))
    with pytest.raises(ValueError, match="input must have a floating dtype"):
        fastattn.linear(torch.ones(3, 4, dtype=torch.int64), w)


def test_cpu_kernel_checks_its_arguments():
    from fastattn import _backend
    if _backend.unavailable_reason("cpu", "cpu") is not None:
        pytest.fail("the cpu backend must be built for the tests")
    ops = torch.ops.fastattn_kernels
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.linear_forward(x.view(1, 3, 4), w, None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(out_features, 4\)"):
        ops.linear_forward(x, torch.randn(5, 3), None)
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        ops.linear_forward(x, w.half(), None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.linear_forward(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.linear_forward(x.double(), w.double(), None)
    # the kernel itself takes any row count (the limit is the selector's)
    xs = torch.randn(40, 33)
    ws, bs = torch.randn(7, 33), torch.randn(7)
    terms = xs.double().abs() @ ws.double().abs().T + bs.double().abs()
    assert_dot_fp32(ops.linear_forward(xs, ws, bs), F.linear(*(t.double() for t in (xs, ws, bs))),
                    terms, 33)


# ------------------------------------------------------------------ compile and opcheck

def _eager_and_compiled(fn, *inputs):
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
              for t in inputs]
        with fastattn.record_dispatch() as calls:
            out = f(*xs)
        leaves = [t for t in xs if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel())
                                    .view(out.shape).to(out.dtype))
        results.append((out.detach(), grads, calls))
    return results


@pytest.mark.parametrize("backend", ["cpu", "torch", "auto"])
@pytest.mark.parametrize("lead", [(3,), (2, 1), (), (17,), (2, 9)],
                         ids=lambda s: "x".join(map(str, s)) or "1d")
@pytest.mark.parametrize("bias", [False, True])
def test_compile_fullgraph_matches_eager(backend, lead, bias):
    """torch.compile(fullgraph=True) (aot_eager: dynamo, the fake and autograd, no codegen)
    of a function calling fastattn.linear gives the eager output and gradients, bitwise (the
    same kernel and ATen matmuls run), on the backend eager runs; the cpu backend refuses
    more than 16 rows when tracing."""
    rows = torch.Size(lead).numel()
    torch._dynamo.reset()
    x = rand(*lead, 24, seed=1).requires_grad_()
    w = rand(6, 24, seed=2).requires_grad_()
    b = rand(6, seed=3).requires_grad_() if bias else None

    def fn(x, w, b):
        return torch.tanh(fastattn.linear(x, w, b)) * 2
    if backend == "cpu" and rows > max_rows(torch.float32):   # refused while tracing
        with fastattn.use_backend(backend), pytest.raises(RuntimeError,
                                                          match="more than 16 rows"):
            torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, b)
        torch._dynamo.reset()
        return
    with fastattn.use_backend(backend):
        (eo, eg, ecalls), (co, cg, ccalls) = _eager_and_compiled(fn, x, w, b)
    torch._dynamo.reset()
    assert ecalls == ccalls == [("linear", expected_backend(backend, rows))]
    assert torch.equal(co, eo)
    for a, e in zip(cg, eg):
        assert torch.equal(a, e)


def test_compile_with_dynamic_rows():
    """A compiled function called at several row counts (a prefill's sequence length, the
    batch): dynamo makes the rows dynamic on the second count, and fastattn.linear must not
    hand the selector (constants only while tracing) a symbolic row count (it did:
    torch._dynamo.exc.Unsupported under fullgraph)."""
    torch._dynamo.reset()
    w, b = rand(6, 24, seed=2), rand(6, seed=3)
    f = torch.compile(lambda t: fastattn.linear(t, w, b), fullgraph=True, backend="aot_eager")
    try:
        for rows in (3, 5, 7, 16, 20, 33, 2):
            x = rand(rows, 24, seed=rows)
            with fastattn.record_dispatch() as calls:
                y = f(x)
            assert calls == [("linear", expected_backend("auto", rows))]
            torch.testing.assert_close(y, F.linear(x, w, b))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    """torch.library.opcheck of fastattn::linear: schema, fake, autograd registration."""
    def r(*shape, seed, dtype=torch.float32):
        return rand(*shape, seed=seed, dtype=dtype).requires_grad_()
    samples = [
        (r(3, 17, seed=1), r(5, 17, seed=2), r(5, seed=3)),
        (r(1, 17, seed=4), r(5, 17, seed=5), None),
        (r(16, 9, seed=6, dtype=torch.bfloat16), r(130, 9, seed=7, dtype=torch.bfloat16),
         r(130, seed=8, dtype=torch.bfloat16)),
        (r(4, 33, seed=9), r(66, 33, seed=10)[::2], r(33, seed=11)),   # strided weight
        (r(0, 8, seed=12), r(3, 8, seed=13), r(3, seed=14)),
    ]
    for x, w, b in samples:
        torch.library.opcheck(torch.ops.fastattn.linear.default, (x, w, b, backend))


def test_kernel_opcheck():
    from fastattn import _backend
    if _backend.unavailable_reason("cpu", "cpu") is not None:
        pytest.fail("the cpu backend must be built for the tests")
    x = rand(6, 40, seed=1)[:, 3:36]                       # row stride 40, offset
    w, b = rand(7, 33, seed=2), rand(7, seed=3)
    ops = torch.ops.fastattn_kernels
    # The kernel op runs only inside fastattn::linear's body (never traced): schema only.
    for args in ((x, w, b), (x.bfloat16(), w.t().contiguous().t().bfloat16(), None)):
        torch.library.opcheck(ops.linear_forward.default, args, test_utils=("test_schema",))
