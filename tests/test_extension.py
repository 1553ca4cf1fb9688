"""The C++/CUDA extension fastattn._C itself: build_info, op schemas/fakes (opcheck), argument
errors that name the argument, strided and offset views, and the adaptor's unsupported()."""

import json

import pytest
import torch

from fastattn import _C_ops, reference

pytestmark = pytest.mark.skipif(_C_ops._IMPORT_ERROR is not None,
                                reason="fastattn._C not built")
ops = torch.ops.fastattn_kernels


def test_build_info():
    info = json.loads(ops.build_info())
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_archs"], str)
    assert info["cpu_kernels"] is True
    assert info["compiler"].split()[0] in ("gcc", "clang")
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and info["nvcc"].startswith("nvcc ")


# ------------------------------------------------------------------ opcheck


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 9, generator=g)
    bool_mask = torch.rand(5, 9, generator=g).gt(0.3).expand(2, 3, 5, 9)
    float_mask = torch.randn(2, 3, 5, 9, generator=g)
    y = torch.softmax(x, -1)
    rows = torch.randn(6, 40, generator=g)[:, 3:36]  # offset rows, row stride 40
    w, b = torch.randn(33, generator=g), torch.randn(33, generator=g)
    _, mean, rstd, _ = ops.layer_norm_forward(rows, w, b, 1e-5, None)
    _, rms_rstd, _ = ops.rms_norm_forward(rows, w, 1e-5, None)
    q = torch.randn(2, 7, 3, 16, generator=g)
    cos, sin = reference.rotary_cache(10, 12)
    offs = torch.tensor([0, 3])
    cases = [
        ("softmax_forward", (x, 0.5, None, False)),
        ("softmax_forward", (x.transpose(-1, -2), 1.0, bool_mask.transpose(-1, -2), True)),
        ("softmax_forward", (x.bfloat16(), 1.0, float_mask.bfloat16(), False)),
        ("softmax_backward", (torch.randn_like(y), y, 0.5)),
        ("layer_norm_forward", (rows, w, b, 1e-5, None)),
        ("layer_norm_forward", (rows.half(), None, None, 1e-5, rows.half())),
        ("layer_norm_backward", (torch.randn(6, 33), rows, w, b, mean, rstd, None)),
        ("layer_norm_backward", (torch.randn(6, 33), rows, None, None, mean, rstd,
                                 torch.randn(6, 33))),
        ("rms_norm_forward", (rows, w, 1e-6, torch.randn(6, 33))),
        ("rms_norm_backward", (torch.randn(6, 33), rows, w, rms_rstd, None)),
        ("rotary_forward", (q, cos, sin, False, None, False)),
        ("rotary_forward", (q.transpose(1, 2).contiguous().transpose(1, 2), cos, sin, True, offs,
                            True)),
        ("rotary_forward_out", (q, cos, sin, False, offs, False, torch.empty_like(q))),
        ("rotary_forward_inplace", (q.clone(), cos, sin, True, None, False)),
        ("swiglu_forward", (rows, rows.t().contiguous().t())),       # strided, then not
        ("swiglu_forward", (rows.bfloat16(), torch.randn(6, 33, generator=g).bfloat16())),
        ("swiglu_backward", (torch.randn(6, 33, generator=g), rows, rows * 2)),
    ]
    if hasattr(ops, "attention_forward"):
        aq, ak, av = (torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 1, 6, 8, generator=g),
                      torch.randn(1, 1, 6, 8, generator=g))
        args = (None, 0.35, True, True, -1, -1, 0.0, None)
        drop = (0.2, 3, 1)  # dropout_p, seed, offset
        out, lse = ops.attention_forward(aq, ak, av, *args, *drop)
        cases += [("attention_forward", (aq, ak, av) + args + drop),
                  ("attention_backward", (torch.randn_like(out), aq, ak, av, out, lse) + args
                   + (False,) + drop),
                  ("attention_dropout_mask", (1, 2, 4, 6) + drop)]
    return cases


@pytest.mark.parametrize("name,args", _opcheck_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    # The kernel ops run only inside the public ops' bodies (never traced): no fake to check.
    torch.library.opcheck(getattr(ops, name).default, args, test_utils=("test_schema",))


# ------------------------------------------------------------------ argument errors


def test_softmax_errors():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.softmax_forward(x.double(), 1.0, None, False)
    with pytest.raises(RuntimeError, match=r"mask \(expanded to x's shape\) must have shape"):
        ops.softmax_forward(x, 1.0, torch.ones(4, 7, dtype=torch.bool), False)
    with pytest.raises(RuntimeError, match="mask must be bool or floating"):
        ops.softmax_forward(x, 1.0, torch.ones(4, 8, dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match="dy must have the dtype of y"):
        ops.softmax_backward(x.half(), x, 1.0)
    with pytest.raises(RuntimeError, match="dy must have shape"):
        ops.softmax_backward(x[:, :4], x, 1.0)


def test_norm_errors():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.layer_norm_forward(x.view(2, 2, 8), None, None, 1e-5, None)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.rms_norm_forward(x.to(torch.int64), None, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[8\]"):
        ops.layer_norm_forward(x, torch.ones(7), None, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[8\]"):
        ops.layer_norm_forward(x, None, torch.ones(9), 1e-5, None)
    with pytest.raises(RuntimeError, match="residual must have the dtype of x"):
        ops.rms_norm_forward(x, None, 1e-5, x.half())
    with pytest.raises(RuntimeError, match="residual must have shape"):
        ops.rms_norm_forward(x, None, 1e-5, x[:3])
    _, mean, rstd, _ = ops.layer_norm_forward(x, None, None, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"rstd must have shape \[4\]"):
        ops.layer_norm_backward(x, x, None, None, mean, rstd[:3], None)
    with pytest.raises(RuntimeError, match="mean must be float32"):
        ops.layer_norm_backward(x, x, None, None, mean.double(), rstd, None)
    with pytest.raises(RuntimeError, match="dh_extra must have the dtype of h"):
        ops.rms_norm_backward(x, x, None, rstd, x.half())


def test_rotary_errors():
    x = torch.randn(2, 5, 3, 16)
    cos, sin = reference.rotary_cache(8, 16)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.rotary_forward(x[0], cos, sin, False, None, False)
    with pytest.raises(RuntimeError, match="x's head_dim is 16"):
        ops.rotary_forward(x, *reference.rotary_cache(8, 18), False, None, False)
    with pytest.raises(RuntimeError, match="sin \\(the shape of cos\\) must have shape"):
        ops.rotary_forward(x, cos, sin[:4], False, None, False)
    with pytest.raises(RuntimeError, match="offsets must be int32 or int64"):
        ops.rotary_forward(x, cos, sin, False, torch.zeros(2), False)
    with pytest.raises(RuntimeError, match=r"offsets must have shape \[2\]"):
        ops.rotary_forward(x, cos, sin, False, torch.zeros(3, dtype=torch.long), False)
    with pytest.raises(RuntimeError, match="offsets \\+ positions must lie in"):
        ops.rotary_forward(x, cos, sin, False, torch.tensor([0, 4]), False)
    with pytest.raises(RuntimeError, match="exceeds the cos/sin cache"):
        ops.rotary_forward(x, *reference.rotary_cache(4, 16), False, None, False)
    with pytest.raises(RuntimeError, match="out must have the dtype of x"):
        ops.rotary_forward_out(x, cos, sin, False, None, False, x.half())
    with pytest.raises(RuntimeError, match="out must not share memory with x"):
        ops.rotary_forward_out(x, cos, sin, False, None, False, x)
    with pytest.raises(RuntimeError, match="x must not overlap itself"):
        ops.rotary_forward_inplace(torch.randn(1, 5, 1, 16).expand(2, 5, 3, 16), cos, sin,
                                   False, None, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_errors():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="mask must be on the same device as x"):
        ops.softmax_forward(x, 1.0, torch.ones(4, 8, dtype=torch.bool), False)
    with pytest.raises(RuntimeError, match="weight must be on the same device as x"):
        ops.layer_norm_forward(x, torch.ones(8), None, 1e-5, None)
    cos, sin = reference.rotary_cache(8, 8)
    with pytest.raises(RuntimeError, match="cos must be on the same device as x"):
        ops.rotary_forward(x.view(1, 4, 1, 8), cos, sin.cuda(), False, None, False)


# ------------------------------------------------------------------ views and edge sizes


def test_views_and_empty_inputs():
    base = torch.randn(3, 20, 70)
    view = base[1:, 2:17, 3:68]  # storage offset, non-contiguous rows
    torch.testing.assert_close(ops.softmax_forward(view, 1.0, None, False),
                               torch.softmax(view, -1))
    torch.testing.assert_close(ops.softmax_forward(base.transpose(0, 2), 1.0, None, False),
                               torch.softmax(base.transpose(0, 2), -1))
    empty = torch.randn(0, 16)
    assert ops.softmax_forward(empty, 1.0, None, False).shape == (0, 16)
    y, mean, rstd, h = ops.layer_norm_forward(empty, None, None, 1e-5, None)
    assert y.shape == (0, 16) and mean.shape == (0,) and h.shape == (0,)
    dx, dw = ops.rms_norm_backward(empty, empty, torch.ones(16), torch.ones(0), None)
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros(16))
    x = torch.randn(0, 3, 2, 8)
    assert ops.rotary_forward(x, *reference.rotary_cache(4, 8), False, None, False).shape == x.shape


def test_many_leading_dims():
    # More non-mergeable leading dims than the kernels' row indexer holds: copied, still right.
    x = torch.randn(2, 3, 2, 3, 2, 3, 2, 5)[:, :, :, :, :, :, :, ::2].transpose(0, 6)
    torch.testing.assert_close(ops.softmax_forward(x, 1.0, None, True),
                               reference.softmax(x, causal=True))


def test_unsupported():
    assert _C_ops.unsupported("softmax", dtype=torch.float32, device="cpu") is None
    assert "dtype" in _C_ops.unsupported("softmax", dtype=torch.float64, device="cpu")
    assert _C_ops.unsupported("rotary_qk", dtype=torch.bfloat16, device="cpu") is None
    assert _C_ops.unsupported("no_such_op") is not None
    if hasattr(ops, "attention_forward"):
        assert _C_ops.unsupported("attention", dtype=torch.float16, dropout_p=0.1,
                                  device="cpu") is None  # the CPU kernels implement dropout
        assert _C_ops.unsupported("attention", dtype=torch.float16, dropout_p=0.0,
                                  device="cpu") is None
    if not json.loads(ops.build_info())["cuda_compiled"]:
        assert "CUDA" in _C_ops.unsupported("softmax", dtype=torch.float32, device="cuda")


