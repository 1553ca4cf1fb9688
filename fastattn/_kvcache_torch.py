"""The torch backend of kvcache_attention: gather each batch row's cache into a dense
(B, S_cap, Hkv, D) tensor and run plain masked attention (correct, not fast)."""

import torch


def gather_cache(cache, block_table, cache_batch_idx, batch):
    """(B, S_cap, Hkv, D) view of the cache rows of each batch row (a copy when paged)."""
    if block_table is not None:
        pages = cache[block_table.long()]                     # (B, max_blocks, bs, Hkv, D)
        return pages.flatten(1, 2)
    if cache_batch_idx is not None:
        return cache[cache_batch_idx.long()]
    return cache[:batch]


def positions(lengths, sq, s_cap):
    """(j (1, 1, S_cap), pos (B, Sq, 1)): cache positions and the position of query i of batch
    b, bottom-right aligned over lengths[b] keys."""
    j = torch.arange(s_cap, device=lengths.device).view(1, 1, s_cap)
    pos = (lengths.view(-1, 1, 1) - sq) + torch.arange(sq, device=lengths.device).view(1, sq, 1)
    return j, pos


def visibility(lengths, sq, s_cap, causal, window_left, window_right):
    """bool (B, 1, Sq, S_cap): key j visible to query i of batch b, bottom-right aligned over
    lengths[b] keys."""
    j, pos = positions(lengths, sq, s_cap)
    vis = j < lengths.view(-1, 1, 1)
    if causal:
        vis = vis & (j <= pos)
    if window_left >= 0:
        vis = vis & (j >= pos - window_left)
    if window_right >= 0:
        vis = vis & (j <= pos + window_right)
    return vis.unsqueeze(1)


def kvcache_attention_forward(q, k_cache, v_cache, *, cache_seqlens, seqlen_new, block_table,
                              cache_batch_idx, scale, causal, window_left, window_right,
                              softcap, alibi_slopes=None):
    """out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) fp32. alibi_slopes: None or fp32 (B, H):
    -slope[b, h] * |L_b - Sq + i - j| added to every score (bottom-right positions)."""
    b, sq, h, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    k = gather_cache(k_cache, block_table, cache_batch_idx, b).to(acc)
    v = gather_cache(v_cache, block_table, cache_batch_idx, b).to(acc)
    hkv, s_cap = k.shape[2], k.shape[1]
    group = h // hkv
    qf = q.to(acc).permute(0, 2, 1, 3)                                   # (B, H, Sq, D)
    kf = k.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)           # (B, H, S, D)
    vf = v.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)
    s = torch.matmul(qf, kf.transpose(-2, -1)) * scale                   # (B, H, Sq, S)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    lengths = cache_seqlens.to(torch.int64) + seqlen_new
    if alibi_slopes is not None:
        j, pos = positions(lengths, sq, s_cap)
        dist = (pos - j).abs().to(acc).unsqueeze(1)                     # (B, 1, Sq, S)
        s = s - alibi_slopes.to(acc)[:, :, None, None] * dist
    vis = visibility(lengths, sq, s_cap, causal, window_left, window_right)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                     # (B, H, Sq)
    finite = torch.isfinite(lse)
    p = torch.where(vis, torch.exp(s - torch.where(finite, lse, 0).unsqueeze(-1)), 0)
    out = torch.matmul(p, vf).permute(0, 2, 1, 3)                       # (B, Sq, H, D)
    lse = torch.where(finite, lse, float("-inf"))
    return out.to(q.dtype), lse.to(torch.float32)
