"""torch.library.opcheck on fastattn's Python custom ops (schema, fake impl, autograd), for each
CPU-side backend available here, and torch.compile(fullgraph=True) over the public functions."""

import pytest
import torch

import fastattn
from fastattn import _backend

CPU_BACKENDS = [b for b in ("cpu", "torch") if _backend.unavailable_reason(b, "cpu") is None]


def op_samples(backend):
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)
    cos, sin = fastattn.rotary_cache(8, 8)
    x4 = r(2, 5, 3, 8)                                         # (B, S, H, D)
    return [
        (torch.ops.fastattn.attention.default,
         (r(1, 2, 5, 16), r(1, 2, 7, 16), r(1, 2, 7, 16), None, None, None, 0.25, True, False,
          -1, -1, 0.0, 0.0, False, backend)),
        (torch.ops.fastattn.attention.default,
         (r(1, 4, 5, 16), r(1, 2, 7, 16), r(1, 2, 7, 16), r(1, 1, 5, 7).expand(1, 4, 5, 7),
          torch.tensor([6]), None, 0.25, False, True, 3, -1, 0.0, 0.0, True, backend)),
        (torch.ops.fastattn.softmax.default, (r(4, 9), None, 0.5, False, backend)),
        (torch.ops.fastattn.softmax.default,
         (r(3, 6, 9), torch.rand(6, 9, generator=g).gt(0.3).expand(3, 6, 9), 1.0, True,
          backend)),
        (torch.ops.fastattn.layer_norm.default, (r(4, 33), r(33), r(33), r(4, 33), 1e-5, backend)),
        (torch.ops.fastattn.layer_norm.default, (r(4, 33), None, None, None, 1e-5, backend)),
        (torch.ops.fastattn.rms_norm.default, (r(4, 33), r(33), r(4, 33), 1e-6, backend)),
        (torch.ops.fastattn.rms_norm.default, (r(4, 33), None, None, 1e-6, backend)),
        (torch.ops.fastattn.rotary.default, (x4, cos, sin, None, False, False, backend)),
        (torch.ops.fastattn.rotary.default,
         (x4, cos, sin, torch.tensor([0, 3]), True, False, backend)),
        (torch.ops.fastattn.rotary_qk.default,
         (x4, r(2, 5, 1, 8), cos, sin, None, False, False, backend)),
        (torch.ops.fastattn.swiglu.default, (r(4, 33), r(4, 33), backend)),
        (torch.ops.fastattn.swiglu.default, (r(2, 3, 1), r(2, 3, 1), backend)),
        (torch.ops.fastattn.linear.default, (r(3, 17), r(5, 17), r(5), backend)),
        (torch.ops.fastattn.linear.default, (r(1, 9), r(66, 9)[::2], None, backend)),
    ]


# One registered op per public operation and direction (issue #13); the C++ kernels live in
# their own namespace and run only inside these ops.
PUBLIC_OPS = {"attention", "attention_backward", "attention_weights", "attention_dropout_keep",
              "softmax", "softmax_backward", "layer_norm", "layer_norm_backward", "rms_norm",
              "rms_norm_backward", "rotary", "rotary_", "rotary_qk", "varlen_attention",
              "varlen_attention_backward", "kvcache_attention", "merge_attention_states",
              "swiglu", "swiglu_backward", "linear"}    # linear's backward: ATen matmuls


def _ops_in(namespace):
    import fastattn.ops  # noqa: F401  (registers every op)
    prefix = namespace + "::"
    return {name[len(prefix):].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith(prefix)}


def test_one_registered_op_per_operation_and_direction():
    assert _ops_in("fastattn") == PUBLIC_OPS
    from fastattn import _ext
    if _ext.extension_loaded():
        kernels = _ops_in("fastattn_kernels")
        assert kernels, kernels
        assert all(n.endswith(("_forward", "_backward", "_out", "_inplace", "_mask"))
                   or n == "build_info" for n in kernels), kernels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    for op, args in op_samples(backend):
        torch.library.opcheck(op, args)


def test_opcheck_inplace_rotary():
    cos, sin = fastattn.rotary_cache(8, 8)
    for backend in CPU_BACKENDS:
        torch.library.opcheck(torch.ops.fastattn.rotary_.default,
                              (torch.randn(2, 5, 3, 8), cos, sin, None, False, False, backend),
                              test_utils=("test_schema", "test_faketensor"))


def block(x, w, b, cos, sin):
    """A pre-norm attention block written with the public functions only."""
    h = fastattn.layer_norm(x, (x.shape[-1],), w, b)            # (B, S, E)
    bsz, s, e = h.shape
    qkv = h.view(bsz, s, 3, 2, e // 6).permute(2, 0, 3, 1, 4)     # (3, B, H, S, D)
    q, k = fastattn.apply_rotary_qk(qkv[0], qkv[1], cos, sin)
    a = fastattn.scaled_dot_product_attention(q, k, qkv[2], is_causal=True)
    y = a.transpose(1, 2).reshape(bsz, s, e // 3)
    return fastattn.rms_norm(fastattn.softmax(y, scale=0.5), (e // 3,))


# aot_eager: the same dynamo tracing, fake implementations and autograd as inductor without its
# codegen (tests/test_compile.py compiles a module block with inductor).
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 48, generator=g, requires_grad=True)
    w = torch.randn(48, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    cos, sin = fastattn.rotary_cache(6, 8)
    with fastattn.use_backend(backend):
        eager = block(x, w, b, cos, sin)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, w, b, cos, sin)
        torch.testing.assert_close(compiled, eager)
        grads_e = torch.autograd.grad(eager.sum(), (x, w, b))
        grads_c = torch.autograd.grad(compiled.sum(), (x, w, b))
    for a, c in zip(grads_e, grads_c):
        torch.testing.assert_close(c, a)
