"""KV-cache decode cases: fastattn.kvcache_attention (one new query token per sequence over a
filled cache, GQA) against F.scaled_dot_product_attention on the same cache slice with
enable_gqa=True (the natural PyTorch call: (B, S, Hkv, D) cache viewed as (B, Hkv, S, D))."""

import torch
import torch.nn.functional as F

from .common import Case, Pair, element_size, fastattn_on, forward_only, randn


def _case(b, h, hkv, s, d, dtype, backend):
    def build(device):
        import fastattn
        q = randn((b, 1, h, d), dtype, device, False, 1)                  # (B, 1, H, D)
        k_cache = randn((b, s, hkv, d), dtype, device, False, 2)          # (B, S, Hkv, D)
        v_cache = randn((b, s, hkv, d), dtype, device, False, 3)
        lens = torch.full((b,), s, dtype=torch.int32, device=device)

        def ours(q, k_cache, v_cache):
            return fastattn.kvcache_attention(q, k_cache, v_cache, cache_seqlens=lens)

        def sdpa(q, k_cache, v_cache):                                    # same (B, 1, H, D)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k_cache[:, :s].transpose(1, 2),
                v_cache[:, :s].transpose(1, 2), enable_gqa=True)
            return out.transpose(1, 2)
        inputs = (q, k_cache, v_cache)
        return Pair(fastattn_on(backend, forward_only(ours, inputs)), forward_only(sdpa, inputs))

    cache_bytes = 2.0 * b * s * hkv * d * element_size(dtype)              # K and V read once
    return Case(op="kvcache", variant="decode",
                shape={"B": b, "H": h, "Hkv": hkv, "S": s, "D": d}, dtype=dtype,
                direction="fwd", backend=backend,
                baseline="F.scaled_dot_product_attention (enable_gqa)", build=build,
                flops=4.0 * b * h * s * d, bytes=cache_bytes, bound="memory")


def cases(device_type, quick, backends):
    out = []
    for be in backends:
        if device_type == "cpu":
            out.append(_case(4, 32, 8, 4096, 128, torch.float32, be))
            if not quick:
                out.append(_case(1, 32, 8, 4096, 128, torch.float32, be))   # split-K
                out.append(_case(4, 32, 8, 4096, 128, torch.bfloat16, be))
        else:
            for dtype in (torch.float16, torch.bfloat16):
                out.append(_case(8, 32, 8, 8192, 128, dtype, be))
                if not quick:
                    out.append(_case(1, 32, 8, 32768, 128, dtype, be))
    return out
