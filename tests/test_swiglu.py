"""fastattn.swiglu on every backend against the reference (output and both gradients)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_device
from tolerances import assert_within_2x

import fastattn
from fastattn import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_swiglu(gate, up):
    """fastattn.swiglu(gate, up) on the tensors as given (detach() keeps a view's strides, so
    a strided view stays strided) against the fp32 reference and PyTorch in the input dtype,
    output and both gradients; returns record_dispatch()'s log."""
    g_in = gate.detach().requires_grad_()
    u_in = up.detach().requires_grad_()
    assert g_in.stride() == gate.stride() and u_in.stride() == up.stride()
    with fastattn.record_dispatch() as calls:
        y = fastattn.swiglu(g_in, u_in)
    assert y.dtype == gate.dtype and y.shape == gate.shape and y.device == gate.device

    def ref_run(dtype):
        gr = gate.detach().to(dtype).requires_grad_()
        ur = up.detach().to(dtype).requires_grad_()
        return reference.swiglu(gr, ur), (gr, ur)

    ref, ref_in = ref_run(torch.float32)
    pt, pt_in = ref_run(gate.dtype)
    assert_within_2x(y, ref, pt, name="y")
    if y.numel() == 0:
        return calls
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    ours = torch.autograd.grad(y, (g_in, u_in), dy)
    theirs = torch.autograd.grad(ref, ref_in, dy.float())
    lowp = torch.autograd.grad(pt, pt_in, dy)
    for name, a, r, p in zip(("dgate", "dup"), ours, theirs, lowp):
        assert a.dtype == gate.dtype
        assert_within_2x(a, r, p, name=name)
    return calls


def rand(*shape, seed=0, scale=1.0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 33), (97, 1000), (3, 4097), (2, 65536), (2, 3, 5, 7)])
def test_sizes(backend, dtype, shape):
    dev = backend_device(backend)
    calls = check_swiglu(rand(*shape, seed=1, scale=3.0, device=dev, dtype=dtype),
                         rand(*shape, seed=2, device=dev, dtype=dtype))
    assert calls == [("swiglu", backend)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(backend, dtype):
    dev = backend_device(backend)
    base_g = rand(9, 66, seed=3, scale=2.0, device=dev, dtype=dtype)
    base_u = rand(33, 9, seed=4, device=dev, dtype=dtype)
    gate, up = base_g[:, ::2], base_u.t()                         # (9, 33) each, not contiguous
    assert not gate.is_contiguous() and not up.is_contiguous()
    check_swiglu(gate, up)
    # expanded (stride 0) up and a sliced gate with a storage offset
    check_swiglu(base_g[2:7, 1:34], rand(33, seed=5, device=dev, dtype=dtype).expand(5, 33))


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_and_tiny_gates(backend, dtype):
    """|gate| up to 1e4 (sigmoid is exactly 0 or 1: exp(-g) overflows for g < -88) and tiny
    values (silu(g) ~ g / 2): finite, right values and gradients."""
    dev = backend_device(backend)
    big = 2e3 if dtype == torch.float16 else 1e4          # fp16: products stay below 65504
    g = torch.tensor([-big, -100.0, -88.5, -20.0, -1.2785, 0.0, 1e-30, -1e-30, 1e-3, 20.0,
                      100.0, big])
    g = g.to(dtype).to(dev)
    u = rand(g.numel(), seed=6, device=dev, dtype=dtype)
    check_swiglu(g, u)
    check_swiglu(rand(5, 40, seed=8, scale=big / 4, device=dev, dtype=dtype),
                 rand(5, 40, seed=9, device=dev, dtype=dtype))
    check_swiglu(rand(5, 40, seed=8, scale=1e-20, device=dev, dtype=torch.float32),
                 rand(5, 40, seed=9, device=dev, dtype=torch.float32))


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 2)])
def test_empty(backend, shape):
    dev = backend_device(backend)
    gate = torch.empty(shape, device=dev).requires_grad_()
    up = torch.empty(shape, device=dev).requires_grad_()
    y = fastattn.swiglu(gate, up)
    assert y.shape == shape
    dg, du = torch.autograd.grad(y.sum(), (gate, up))
    assert dg.shape == shape and du.shape == shape


def test_no_grad_call_matches_the_grad_call(backend):
    """The direct call (no autograd: the op's body without the custom op) and the custom op."""
    dev = backend_device(backend)
    g, u = rand(6, 50, seed=10, device=dev), rand(6, 50, seed=11, device=dev)
    with torch.no_grad():
        a = fastattn.swiglu(g, u)
    b = fastattn.swiglu(g.clone().requires_grad_(), u)
    torch.testing.assert_close(a, b.detach(), atol=0, rtol=0)


def test_float64_runs_on_the_torch_backend():
    g = rand(4, 9, seed=12, dtype=torch.float64).requires_grad_()
    u = rand(4, 9, seed=13, dtype=torch.float64).requires_grad_()
    with fastattn.record_dispatch() as calls:
        y = fastattn.swiglu(g, u)
    assert calls == [("swiglu", "torch")]
    torch.testing.assert_close(y, F.silu(g) * u)
    assert torch.autograd.gradcheck(fastattn.swiglu, (g, u))


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    from fastattn import _backend
    if _backend.unavailable_reason("cpu", "cpu") is not None:
        pytest.fail("the cpu backend must be built for the tests")
    with fastattn.record_dispatch() as calls:
        fastattn.swiglu(torch.randn(3, 4), torch.randn(3, 4))
        fastattn.swiglu(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4))
    assert calls == [("swiglu", "cpu"), ("swiglu", "cpu")]


def test_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="gate must have a floating dtype"):
        fastattn.swiglu(torch.ones(3, 4, dtype=torch.int64), x)
    with pytest.raises(ValueError, match="up must have a floating dtype"):
        fastattn.swiglu(x, torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="up must have gate's shape"):
        fastattn.swiglu(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="up has dtype torch.float16 but gate has"):
        fastattn.swiglu(x, x.half())
    with pytest.raises(ValueError, match="up is on meta but gate is on cpu"):
        fastattn.swiglu(x, torch.empty(3, 4, device="meta"))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        fastattn.swiglu([1.0], x)


def test_cpu_kernel_asserts_its_arguments():
    from fastattn import _backend
    if _backend.unavailable_reason("cpu", "cpu") is not None:
        pytest.fail("the cpu backend must be built for the tests")
    ops = torch.ops.fastattn_kernels
    with pytest.raises(RuntimeError, match="up must have shape"):
        ops.swiglu_forward(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="dy must have the dtype of gate"):
        ops.swiglu_backward(torch.randn(3, 4).double(), torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="gate must be float32, float16 or bfloat16"):
        ops.swiglu_forward(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
