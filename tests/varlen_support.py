"""Shared helpers of the varlen_attention tests: packed inputs and the per-sequence oracle.

The oracle is independent of fastattn's varlen code: a Python loop over the sequences calling
the dense reference (fastattn.reference.attention, bottom-right aligned) on each one.
"""

import torch

import fastattn
from fastattn import _backend, reference


def cu_seqlens(lengths):
    """int32 (B + 1,) offsets of `lengths`."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32)


def packed_inputs(lens_q, lens_k, heads, kv_heads, head_dim, dtype, device="cpu", seed=0,
                  scale=1.0):
    """q (total_q, H, D), k, v (total_k, Hkv, D), dout, cu_seqlens_q/k, max lengths."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, heads, head_dim, generator=g) * scale
    k = torch.randn(tk, kv_heads, head_dim, generator=g) * scale
    v = torch.randn(tk, kv_heads, head_dim, generator=g)
    dout = torch.randn(tq, heads, head_dim, generator=g)
    q, k, v, dout = (t.to(device=device, dtype=dtype) for t in (q, k, v, dout))
    return dict(q=q, k=k, v=v, dout=dout, cu_q=cu_seqlens(lens_q).to(device),
                cu_k=cu_seqlens(lens_k).to(device), max_q=max(lens_q, default=0),
                max_k=max(lens_k, default=0))


def oracle(inp, dtype, *, scale=None, causal=False, window=(-1, -1), softcap=0.0,
           dropout_mask=None, dropout_p=0.0, alibi_slopes=None):
    """(out, lse (H, total_q), dq, dk, dv) from a per-sequence loop of reference.attention in
    `dtype`; dropout_mask: the backend's keep-mask (B, H, max_q, max_k) or None;
    alibi_slopes: (H,) or (B, H) (sequence b uses row b) or None."""
    q, k, v = (inp[n].detach().to(dtype).requires_grad_() for n in "qkv")
    cu_q, cu_k = inp["cu_q"].tolist(), inp["cu_k"].tolist()
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)[None]
        ks = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None]
        vs = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None]
        keep = None
        if dropout_mask is not None:
            keep = dropout_mask[b:b + 1, :, :qs.shape[2], :ks.shape[2]]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes.cpu().expand(len(cu_q) - 1, q.shape[1])[b:b + 1]
        o, l = reference.attention(qs, ks, vs, scale=scale, causal=causal,
                                   alignment="bottom_right", window_left=window[0],
                                   window_right=window[1], softcap=softcap, dropout_mask=keep,
                                   dropout_p=dropout_p, return_lse=True,
                                   alibi_slopes=None if slopes is None else slopes.to(q.device))
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    out = torch.cat(outs, 0)
    lse = torch.cat(lses, 1)
    out.backward(inp["dout"].to(dtype))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def run(inp, *, backend=None, **kw):
    """(out, lse, dq, dk, dv) of fastattn.varlen_attention (on `backend` if given)."""
    q, k, v = (inp[n].detach().clone().requires_grad_() for n in "qkv")
    ctx = fastattn.use_backend(backend) if backend else _null()
    with ctx:
        out, lse = fastattn.varlen_attention(q, k, v, inp["cu_q"], inp["cu_k"], inp["max_q"],
                                             inp["max_k"], return_lse=True, **kw)
        out.backward(inp["dout"])
    return out.detach(), lse, q.grad, k.grad, v.grad


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def keep_mask(backend, inp, dropout_p, seed, offset):
    """The backend's varlen dropout keep-mask (B, H, max_q, max_k) for (seed, offset)."""
    mod = _backend.backend_module(backend, "varlen_attention")
    return mod.varlen_dropout_keep_mask(inp["cu_q"].shape[0] - 1, inp["q"].shape[1],
                                        inp["max_q"], inp["max_k"], dropout_p, seed, offset,
                                        inp["q"].device)


def lse_matches(lse, ref, atol):
    """lse equal to ref: -inf exactly where ref is -inf, close elsewhere."""
    assert lse.shape == ref.shape and lse.dtype == torch.float32
    inf = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), inf), "lse: -inf rows differ"
    if (~inf).any():
        err = (lse[~inf].double() - ref[~inf].double()).abs().max().item()
        assert err <= atol, f"lse: max error {err:.3g} > {atol}"
