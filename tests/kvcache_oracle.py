"""Independent oracle for fastattn.kvcache_attention: plain PyTorch math, one sequence and one
head at a time (shares no code with fastattn). Also builds random KV-cache cases and checks a
backend's result against it (the 2x rule of DESIGN.md), for tests/test_kvcache_attention.py
and tests/test_fuzz_kvcache.py."""

import math
from dataclasses import dataclass, field

import torch
from tolerances import (KVCACHE_APPEND_ULPS, KVCACHE_LSE_FP32_ATOL, KVCACHE_LSE_LOWP_FLOOR,
                        assert_max_err, assert_within_2x, bound_2x)

import fastattn


def rotate(x, cos, sin, pos, interleaved):
    """x (S, Hx, D) rotated at positions pos (S,), computed in fp32 and rounded to x's dtype."""
    r2 = cos.shape[1]
    xf = x.float().clone()
    c, s = cos[pos].float()[:, None, :], sin[pos].float()[:, None, :]       # (S, 1, R/2)
    if interleaved:
        a, b = xf[..., 0:2 * r2:2].clone(), xf[..., 1:2 * r2:2].clone()
        xf[..., 0:2 * r2:2], xf[..., 1:2 * r2:2] = a * c - b * s, a * s + b * c
    else:
        a, b = xf[..., :r2].clone(), xf[..., r2:2 * r2].clone()
        xf[..., :r2], xf[..., r2:2 * r2] = a * c - b * s, a * s + b * c
    return xf.to(x.dtype)


def slot(b, n, block_table, cache_batch_idx, block_size):
    """(page, row) of cache position n of sequence b."""
    if block_table is not None:
        return int(block_table[b, n // block_size]), n % block_size
    return (int(cache_batch_idx[b]) if cache_batch_idx is not None else b), n


def oracle(c, dtype):
    """out (B, Sq, H, D), lse (B, H, Sq) and the updated caches, computed in `dtype`
    (the inputs are cast to it; the cache append keeps the cache's own dtype)."""
    B, Sq, H, D = c.q.shape
    Hkv = c.k_cache.shape[2]
    group = H // Hkv
    bs = c.k_cache.shape[1]
    kc, vc = c.k_cache.clone(), c.v_cache.clone()
    sl = c.cache_seqlens.tolist()
    s_new = 0 if c.k is None else c.k.shape[1]
    scale = c.scale if c.scale is not None else 1.0 / math.sqrt(D)
    wl, wr = c.window if c.window is not None else (-1, -1)
    out = torch.zeros(B, Sq, H, D, dtype=dtype)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32)
    for b in range(B):
        q = c.q[b]                                                           # (Sq, H, D)
        if s_new:
            pos = torch.arange(sl[b], sl[b] + s_new)
            k, v = c.k[b], c.v[b]
            if c.rotary:
                k = rotate(k, c.cos, c.sin, pos, c.interleaved)
                # flash-attn's rule: local means window_size != (-1, -1)
                local = c.causal or (c.window is not None and any(w >= 0 for w in c.window))
                # flash-attn 2: query t at cache_seqlens[b] + t (whatever Sq_new is), or every
                # query at cache_seqlens[b] when neither causal nor local
                qpos = (torch.arange(sl[b], sl[b] + Sq) if local
                        else torch.full((Sq,), sl[b], dtype=torch.long))
                q = rotate(q, c.cos, c.sin, qpos, c.interleaved)
            for t in range(s_new):
                page, row = slot(b, sl[b] + t, c.block_table, c.cache_batch_idx, bs)
                kc[page, row], vc[page, row] = k[t], v[t]
        L = sl[b] + s_new
        n = torch.arange(L)
        if c.block_table is not None:
            pages, rows = c.block_table[b].long()[n // bs], n % bs
        else:
            page = int(c.cache_batch_idx[b]) if c.cache_batch_idx is not None else b
            pages, rows = torch.full((L,), page, dtype=torch.long), n
        K, V = kc[pages, rows].to(dtype), vc[pages, rows].to(dtype)        # (L, Hkv, D)
        qd = q.to(dtype)
        i = torch.arange(Sq)[:, None]
        j = n[None, :]
        p_i = L - Sq + i
        vis = torch.ones(Sq, L, dtype=torch.bool)
        if c.causal:
            vis &= j <= p_i
        if wl >= 0:
            vis &= j >= p_i - wl
        if wr >= 0:
            vis &= j <= p_i + wr
        seen = vis.any(1)                                                    # (Sq,)
        for h in range(H):
            s = (qd[:, h] @ K[:, h // group].T) * scale                     # (Sq, L)
            if c.softcap > 0:
                s = c.softcap * torch.tanh(s / c.softcap)
            if c.alibi is not None:                 # ALiBi: -slope * |position_i - j|
                slope = c.alibi.expand(B, H)[b, h].to(dtype)
                s = s - slope * (p_i - j).abs().to(dtype)
            s = s.masked_fill(~vis, float("-inf"))
            m = torch.where(seen, s.max(1).values if L else 0, 0)          # (Sq,)
            p = torch.exp(s - m[:, None])
            total = p.sum(1)
            o = (p / torch.where(seen, total, 1)[:, None]) @ V[:, h // group]
            out[b, :, h] = torch.where(seen[:, None], o, 0)
            lse[b, h] = torch.where(seen, (m + torch.log(total)).float(), float("-inf"))
    return out, lse, kc, vc


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    k: torch.Tensor = None
    v: torch.Tensor = None
    block_table: torch.Tensor = None
    cache_batch_idx: torch.Tensor = None
    rotary: bool = False
    cos: torch.Tensor = None
    sin: torch.Tensor = None
    interleaved: bool = False
    causal: bool = True
    window: tuple = None
    softcap: float = 0.0
    scale: float = None
    alibi: torch.Tensor = None
    desc: dict = field(default_factory=dict)

    def kwargs(self, device):
        to = (lambda t: None if t is None else t.to(device))
        return dict(cache_seqlens=to(self.cache_seqlens), block_table=to(self.block_table),
                    cache_batch_idx=to(self.cache_batch_idx),
                    rotary_cos=to(self.cos) if self.rotary else None,
                    rotary_sin=to(self.sin) if self.rotary else None,
                    rotary_interleaved=self.interleaved, scale=self.scale,
                    is_causal=self.causal, window=self.window, softcap=self.softcap,
                    return_lse=True, alibi_slopes=to(self.alibi))


def make_case(*, B=2, Sq=1, H=4, Hkv=2, D=32, lens=(0, 7), s_new=0, s_max=None,
              block_size=None, cache_batch=None, rotary=None, interleaved=False, causal=True,
              window=None, softcap=0.0, scale=None, dtype=torch.float32, logit_scale=1.0,
              seed=0, alibi=None):
    """A random case. block_size: paged cache with a shuffled block table; cache_batch: a
    contiguous cache of that many rows addressed by a random cache_batch_idx; rotary: the
    rotary dim (needs s_new > 0); alibi: None, "head" (slopes (H,)) or "batch" ((B, H))."""
    g = torch.Generator().manual_seed(seed)
    rnd = (lambda *s: torch.randn(*s, generator=g).to(dtype))
    lens = torch.tensor(lens, dtype=torch.int32)
    need = int(lens.max()) + s_new if B else s_new
    s_max = max(need, 1) if s_max is None else s_max
    q = rnd(B, Sq, H, D) * logit_scale
    case = dict(cache_seqlens=lens, q=q)
    if block_size is not None:
        max_blocks = max(1, -(-s_max // block_size))
        n_blocks = B * max_blocks + 3                                       # spare pages
        perm = torch.randperm(n_blocks, generator=g)[:B * max_blocks]
        case["block_table"] = perm.view(B, max_blocks).to(torch.int32)
        shape = (n_blocks, block_size, Hkv, D)
    elif cache_batch is not None:
        case["cache_batch_idx"] = torch.randperm(cache_batch, generator=g)[:B].to(torch.int32)
        shape = (cache_batch, s_max, Hkv, D)
    else:
        shape = (B, s_max, Hkv, D)
    case["k_cache"], case["v_cache"] = rnd(*shape), rnd(*shape)
    if s_new:
        case["k"], case["v"] = rnd(B, s_new, Hkv, D), rnd(B, s_new, Hkv, D)
    if rotary:
        case["cos"], case["sin"] = fastattn.rotary_cache(s_max + 4, rotary)
    if alibi is not None:                   # drawn last: the other tensors stay as without it
        case["alibi"] = torch.rand(*((H,) if alibi == "head" else (B, H)), generator=g) * 0.6
    desc = dict(B=B, Sq=Sq, H=H, Hkv=Hkv, D=D, lens=lens.tolist(), s_new=s_new, s_max=s_max,
                block_size=block_size, cache_batch=cache_batch, rotary=rotary,
                interleaved=interleaved, causal=causal, window=window, softcap=softcap,
                scale=scale, dtype=str(dtype), logit_scale=logit_scale, seed=seed, alibi=alibi)
    return Case(rotary=bool(rotary), interleaved=interleaved, causal=causal, window=window,
                softcap=softcap, scale=scale, desc=desc, **case)


def check(case, device):
    """Runs fastattn.kvcache_attention (current backend) on `case` and compares out, lse and
    the appended caches with the oracle. Returns (out, lse)."""
    dtype = case.q.dtype
    ref = oracle(case, torch.float64 if dtype == torch.float32 else torch.float32)
    pt = oracle(case, dtype)
    kc, vc = case.k_cache.clone().to(device), case.v_cache.clone().to(device)
    to = (lambda t: None if t is None else t.to(device))
    with torch.no_grad():
        out, lse = fastattn.kvcache_attention(to(case.q), kc, vc, to(case.k), to(case.v),
                                              **case.kwargs(device))
    out, lse, kc, vc = out.cpu(), lse.cpu(), kc.cpu(), vc.cpu()
    what = f"config {case.desc}"
    assert out.shape == ref[0].shape and out.dtype == dtype, what
    assert lse.shape == ref[1].shape and lse.dtype == torch.float32, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert_within_2x(out, ref[0], pt[0], name=f"out, {what}")
    # lse: -inf exactly where the oracle's row is empty, close elsewhere
    empty = torch.isinf(ref[1])
    assert torch.equal(torch.isneginf(lse), empty), f"lse empty rows differ, {what}"
    tol = KVCACHE_LSE_FP32_ATOL if dtype == torch.float32 else \
        bound_2x(pt[1][~empty], ref[1][~empty], KVCACHE_LSE_LOWP_FLOOR)
    assert_max_err(lse[~empty], ref[1][~empty], tol, f"lse, {what}")
    # The cache the oracle builds: appended rows rotated in fp32 and rounded to the dtype; a
    # backend may round its intermediate products too (two rounding steps of the dtype).
    tol = KVCACHE_APPEND_ULPS[dtype]
    for got, want, name in ((kc, ref[2], "k_cache"), (vc, ref[3], "v_cache")):
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol,
                                   msg=lambda m: f"{name} after append, {what}: {m}")
    return out, lse
