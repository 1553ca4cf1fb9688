"""fastattn.attention_forward_with_lse / attention_backward_with_lse on every backend.

The property ring attention relies on: split the keys into blocks, run the forward per block
and merge, then run the backward per block with the *merged* (global) out and lse; dq summed
over blocks and each block's dk/dv must equal the full attention's gradients (fp32 tight,
fp16/bf16 by the 2x rule against the fp32 and low-precision references).
"""

import pytest
import torch
from conftest import backend_device
from tolerances import (FP32_TOL, TIGHT_FP32_TOL, assert_max_err, assert_within_2x, bound_2x,
                        floor_for)

import fastattn
from fastattn import reference
from fastattn.distributed import plan

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(b, h, hkv, s, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    dout = torch.randn(b, h, s, d, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


def blockwise(q, k, v, dout, bounds, causal, window, scale, softcap=0.0):
    """Forward per key block + merge, then backward per block with the merged (out, lse).
    Causal/window blocks get their kernel arguments from fastattn.distributed.plan."""
    b, h, s, d = q.shape
    calls = []
    for k0, k1 in zip(bounds, bounds[1:]):
        c = plan.block_call(0, 0, s, k0, k0, k1 - k0, causal, window)
        if c is not None:
            calls.append(c)
    out = torch.zeros(b, h, s, d)
    lse = torch.full((b, h, s), float("-inf"))
    for c in calls:
        qs, ks = slice(c.q_start, c.q_end), slice(c.k_start, c.k_end)
        o, l_ = fastattn.attention_forward_with_lse(q[:, :, qs], k[:, :, ks], v[:, :, ks],
                                                    scale=scale, is_causal=c.is_causal,
                                                    window=c.window, softcap=softcap)
        assert o.dtype == q.dtype and l_.dtype == torch.float32 and not o.requires_grad
        o, l_ = fastattn.merge_attention_states(out[:, :, qs].to(q.device), lse[:, :, qs].to(
            q.device), o.float(), l_)
        out[:, :, qs], lse[:, :, qs] = o.cpu(), l_.cpu()
    out_q = out.to(device=q.device, dtype=q.dtype)
    lse = lse.to(q.device)
    dq = torch.zeros(q.shape)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    for c in calls:
        qs, ks = slice(c.q_start, c.q_end), slice(c.k_start, c.k_end)
        g = fastattn.attention_backward_with_lse(
            dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out_q[:, :, qs],
            lse[:, :, qs], scale=scale, is_causal=c.is_causal, window=c.window, softcap=softcap)
        dq[:, :, qs] += g[0].cpu().float()
        dk[:, :, ks] += g[1].cpu().float()
        dv[:, :, ks] += g[2].cpu().float()
    return out_q.cpu(), lse.cpu(), dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def reference_grads(q, k, v, dout, dtype, causal, window, scale, softcap=0.0):
    ts = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.attention(*ts, causal=causal, window_left=window[0],
                                   window_right=window[1], scale=scale, softcap=softcap,
                                   return_lse=True)
    out.backward(dout.cpu().to(dtype))
    return out.detach(), lse.detach(), *(t.grad for t in ts)


CASES = [
    # (heads, kv heads, seq, head dim, causal, window, key block bounds)
    (2, 2, 24, 16, False, (-1, -1), [0, 7, 13, 24]),
    (4, 2, 24, 40, True, (-1, -1), [0, 6, 12, 18, 24]),     # GQA, causal diagonal blocks
    (2, 1, 30, 16, True, (5, -1), [0, 10, 20, 30]),          # causal sliding window
    (2, 2, 21, 24, False, (4, 3), [0, 5, 21]),               # two-sided window, uneven blocks
]


def _case_id(c):
    return f"h{c[0]}kv{c[1]}s{c[2]}d{c[3]}{'c' if c[4] else ''}w{c[5][0]}_{c[5][1]}"


# Every case in fp32; fp16/bf16 on the two window cases (GQA/MQA, causal and two-sided), which
# keeps the interpreter's share of the time small.
PARAMS = ([(torch.float32, c) for c in CASES]
          + [(dt, c) for dt in (torch.float16, torch.bfloat16) for c in CASES[2:]])


@pytest.mark.parametrize("dtype,case", PARAMS,
                         ids=[f"{str(dt)[6:]}-{_case_id(c)}" for dt, c in PARAMS])
def test_blockwise_backward_with_global_stats_is_full_gradient(backend, dtype, case):
    h, hkv, s, d, causal, window, bounds = case
    dev = backend_device(backend)
    q, k, v, dout = make(2, h, hkv, s, d, dtype, dev)
    scale = d ** -0.5
    ours = blockwise(q, k, v, dout, bounds, causal, window, scale)
    ref = reference_grads(q, k, v, dout, torch.float32, causal, window, scale)
    pt = reference_grads(q, k, v, dout, dtype, causal, window, scale)
    if dtype == torch.float32:
        torch.testing.assert_close(ours[1], ref[1], **TIGHT_FP32_TOL)   # lse
    else:   # fp32 lse of low-precision scores: the 2x rule against the same references
        assert_max_err(ours[1], ref[1], bound_2x(pt[1], ref[1], floor_for(dtype)), "lse")
    for name, o, r, p in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, pt):
        if name != "lse":
            assert_within_2x(o, r, p, name=name)


def test_backward_with_own_stats_is_ordinary_attention_backward(backend):
    """Given its own forward's (out, lse), the backward equals autograd through the public
    attention (one block = the whole thing), softcap included where the backend has it."""
    dev = backend_device(backend)
    q, k, v, dout = make(1, 2, 2, 19, 32, torch.float32, dev, seed=3)
    out, lse = fastattn.attention_forward_with_lse(q, k, v, is_causal=True,
                                                   causal_alignment="bottom_right")
    dq, dk, dv = fastattn.attention_backward_with_lse(dout, q, k, v, out, lse, is_causal=True,
                                                      causal_alignment="bottom_right")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fastattn.scaled_dot_product_attention(*leaves, is_causal=True,
                                                causal_alignment="bottom_right")
    ref.backward(dout)
    torch.testing.assert_close(out, ref.detach(), **FP32_TOL)
    for a, t in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(a, t.grad, **FP32_TOL)


def test_empty_rows_give_zero_and_zero_grads(backend):
    dev = backend_device(backend)
    q, k, v, dout = make(1, 2, 2, 8, 16, torch.float32, dev, seed=4)
    # Queries at global positions 0..7 against keys at 5..7, causal: rows 0..4 see no key
    # of the block, so the plan trims them and the call covers rows 5..7 only.
    call = plan.block_call(0, 0, 8, 5, 0, 3, True, (-1, -1))   # q at 0..7, keys at 5..7
    o, l_ = fastattn.attention_forward_with_lse(q[:, :, call.q_start:], k[:, :, :3],
                                                v[:, :, :3], is_causal=call.is_causal,
                                                window=call.window)
    assert call.q_start == 5 and torch.isfinite(o).all() and torch.isfinite(l_).all()
    # a row with lse = -inf (no keys in any block) gets exactly zero gradients
    lse = torch.full((1, 2, 8), float("-inf"), device=dev)
    out = torch.zeros(1, 2, 8, 16, device=dev)
    dq, dk, dv = fastattn.attention_backward_with_lse(dout, q, k, v, out, lse)
    assert torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)


def test_bad_input_names_the_argument():
    q, k, v, dout = make(1, 2, 2, 4, 8, torch.float32, "cpu")
    out, lse = fastattn.attention_forward_with_lse(q, k, v)
    with pytest.raises(ValueError, match="lse must have shape"):
        fastattn.attention_backward_with_lse(dout, q, k, v, out, lse[:, :, :2])
    with pytest.raises(ValueError, match="lse must have a floating dtype"):
        fastattn.attention_backward_with_lse(dout, q, k, v, out, lse.double())
    with pytest.raises(ValueError, match="dout must have shape"):
        fastattn.attention_backward_with_lse(dout[:, :1], q, k, v, out, lse)
    with pytest.raises(ValueError, match="q heads"):
        fastattn.attention_forward_with_lse(q[:, :1], k, v)
    with pytest.raises(ValueError, match="causal_alignment"):
        fastattn.attention_forward_with_lse(q, k, v, causal_alignment="middle")
    with pytest.raises(ValueError, match="window"):
        fastattn.attention_forward_with_lse(q, k, v, window="wide")
