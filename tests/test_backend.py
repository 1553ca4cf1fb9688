"""Backend selection: names, the env var, availability errors, auto fallback, dispatch log."""

import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import _backend


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="auto, triton, cuda, cpu, torch"):
        with fastattn.use_backend("cudnn"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_backend_without_gpu_is_a_clear_runtime_error():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        with fastattn.use_backend("cuda"):
            pass


def test_torch_backend_is_used_when_asked():
    x = torch.randn(3, 5)
    with fastattn.use_backend("torch"), fastattn.record_dispatch() as calls:
        fastattn.softmax(x)
    assert calls == [("softmax", "torch")]


def test_use_backend_nests_and_restores():
    assert _backend.requested_backend() in _backend.BACKENDS
    before = _backend.requested_backend()
    with fastattn.use_backend("torch"):
        with fastattn.use_backend("auto"):
            assert _backend.requested_backend() == "auto"
        assert _backend.requested_backend() == "torch"
    assert _backend.requested_backend() == before


def test_auto_on_cpu_prefers_the_cpu_kernels_when_built():
    # make test builds fastattn._C with its CPU kernels (build_info() reads the extension
    # itself, not the backend-selection code under test): auto must pick them
    assert fastattn.build_info()["cpu_kernels"] is True
    x = torch.randn(4, 8)
    with fastattn.use_backend("auto"), fastattn.record_dispatch() as calls:
        fastattn.softmax(x)
    assert calls == [("softmax", "cpu")]


def test_auto_falls_back_to_torch_for_unsupported_cases():
    # float64 is outside every kernel backend's contract; auto must still answer correctly.
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    with fastattn.use_backend("auto"), fastattn.record_dispatch() as calls:
        out = fastattn.scaled_dot_product_attention(q, k, v)
    assert calls == [("attention", "torch")]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_explicit_backend_refuses_unsupported_case_instead_of_falling_back():
    # the cpu kernels are always built by make test; triton runs CPU tensors under the
    # interpreter (read from the environment here, not from the code under test)
    kernel_backends = ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    for name in kernel_backends:
        with fastattn.use_backend(name):
            with pytest.raises(RuntimeError, match="use backend 'auto'"):
                fastattn.scaled_dot_product_attention(q, k, v)


def test_env_var_selects_and_validates():
    code = ("import fastattn, torch\n"
            "from fastattn import _backend\n"
            "print(_backend.requested_backend())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__('os').environ, "FASTATTN_BACKEND": "torch"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    bad = subprocess.run([sys.executable, "-c", code + "fastattn.softmax(torch.ones(2))\n"],
                         capture_output=True, text=True,
                         env={**__import__('os').environ, "FASTATTN_BACKEND": "nope"})
    assert bad.returncode != 0 and "FASTATTN_BACKEND" in bad.stderr


@pytest.mark.parametrize("interpret", ["1", "0", None])
def test_triton_backend_runs_cpu_tensors_only_under_the_interpreter(monkeypatch, interpret):
    # TRITON_INTERPRET is read on each call; set it here rather than reading it back through
    # the code under test
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    reason = _backend.unavailable_reason("triton", "cpu")
    if interpret == "1":
        assert reason is None
    else:
        assert "TRITON_INTERPRET=1" in reason


def test_public_names_exist():
    for name in ("MultiHeadAttention", "LayerNorm", "RMSNorm", "RotaryEmbedding",
                 "scaled_dot_product_attention", "softmax", "layer_norm", "rms_norm",
                 "apply_rotary", "patch", "use_backend", "build_info", "swiglu", "linear"):
        assert hasattr(fastattn, name), name


def test_eager_call_skips_the_custom_op_only_when_nothing_needs_it():
    from fastattn import _backend
    calls = []
    op = lambda *a: calls.append("op")        # noqa: E731
    impl = lambda *a: calls.append("impl")    # noqa: E731
    x = torch.ones(2)
    xg = torch.ones(2, requires_grad=True)
    for backend in ("cpu", "cuda", "torch"):
        _backend.eager_call(op, impl, backend, x, None, 1.0, backend)
        assert calls.pop() == "impl"
        _backend.eager_call(op, impl, backend, xg, backend)         # autograd needed
        assert calls.pop() == "op"
        with torch.no_grad():
            _backend.eager_call(op, impl, backend, xg, backend)
        assert calls.pop() == "impl"
    _backend.eager_call(op, impl, "triton", x, "triton")             # kernels need real tensors
    assert calls.pop() == "op"
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        _backend.eager_call(op, impl, "cpu", fake, "cpu")            # tracing: the op's fake
    assert calls.pop() == "op"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_attention_skips_the_custom_op_only_without_autograd(monkeypatch, backend):
    """Eager attention calls (functional and MultiHeadAttention) that need no gradient run the
    op's body directly; a call that needs autograd goes through the custom op. (window=(-1, -1)
    keeps the plain functional call off the C++ fast path, tests/test_eager_fast_path.py.)"""
    # make test builds fastattn._C: a missing cpu backend is a failure here, not a skip
    assert _backend.unavailable_reason(backend, "cpu") is None
    from fastattn.ops import attention as attention_ops
    seen = []
    real = attention_ops.attention_impl

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(attention_ops, "attention_impl", spy)
    q = torch.randn(1, 2, 3, 16)
    mha = fastattn.MultiHeadAttention(32, 2, batch_first=True)
    x = torch.randn(1, 3, 32)
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(q, q, q, window=(-1, -1))
        assert seen == [backend] and out.grad_fn is None
        with torch.no_grad():
            mha(x, x, x, need_weights=False)
        assert seen == [backend, backend]
        qg = q.clone().requires_grad_()
        out = fastattn.scaled_dot_product_attention(qg, q, q)
        mha(x, x, x, need_weights=False)                         # parameters need grad
    assert seen == [backend, backend] and out.grad_fn is not None
    torch.testing.assert_close(out, fastattn.reference.attention(q, q, q))
