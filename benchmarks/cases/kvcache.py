"""KV-cache decode cases: fastattn.kvcache_attention (one new query token per sequence over a
filled cache, GQA) against

- "decode": F.scaled_dot_product_attention on the same cache slice with enable_gqa=True (the
  natural PyTorch call: (B, S, Hkv, D) cache viewed as (B, Hkv, S, D));
- "decode vs-copy": the machine's own memory speed - a copy_ of the K/V cache the kernel must
  read into preallocated buffers (it reads the same bytes and writes them once more). This is
  the gate's yardstick: SDPA's time on this shape depends on whether the 4 query heads of a KV
  head happen to share the cache in L3, and measured 22-62 ms within one process (medians of
  the speedup 3.0x-6.9x between runs on the idle machine), while the copy moves with the
  memory system as the kernel does (ratio per round 0.97-1.33)."""

import torch
import torch.nn.functional as F

from .common import Case, Pair, element_size, fastattn_on, forward_only, randn


def _inputs(b, h, hkv, s, d, dtype, device):
    q = randn((b, 1, h, d), dtype, device, False, 1)                      # (B, 1, H, D)
    k_cache = randn((b, s, hkv, d), dtype, device, False, 2)              # (B, S, Hkv, D)
    v_cache = randn((b, s, hkv, d), dtype, device, False, 3)
    lens = torch.full((b,), s, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, lens


def _sdpa(q, k_cache, v_cache):                                           # same (B, 1, H, D)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), enable_gqa=True)
    return out.transpose(1, 2)


def _case(b, h, hkv, s, d, dtype, backend, variant="decode"):
    def build(device):
        import fastattn
        q, k_cache, v_cache, lens = _inputs(b, h, hkv, s, d, dtype, device)

        def ours(q, k_cache, v_cache):
            return fastattn.kvcache_attention(q, k_cache, v_cache, cache_seqlens=lens)

        inputs = (q, k_cache, v_cache)
        if variant == "decode":
            reference = _sdpa
        else:
            # Times the copy; returns SDPA's output (computed once, here) for the parity check.
            expected = _sdpa(*inputs)
            k_copy, v_copy = torch.empty_like(k_cache), torch.empty_like(v_cache)

            def reference(q, k_cache, v_cache):
                k_copy.copy_(k_cache)
                v_copy.copy_(v_cache)
                return expected
        return Pair(fastattn_on(backend, forward_only(ours, inputs)),
                    forward_only(reference, inputs))

    cache_bytes = 2.0 * b * s * hkv * d * element_size(dtype)              # K and V read once
    baseline = ("F.scaled_dot_product_attention (enable_gqa)" if variant == "decode" else
                "copy_ of the K/V cache into preallocated buffers (memory yardstick)")
    return Case(op="kvcache", variant=variant,
                shape={"B": b, "H": h, "Hkv": hkv, "S": s, "D": d}, dtype=dtype,
                direction="fwd", backend=backend, baseline=baseline, build=build,
                flops=4.0 * b * h * s * d, bytes=cache_bytes, bound="memory")


def cases(device_type, quick, backends):
    out = []
    for be in backends:
        if device_type == "cpu":
            out.append(_case(4, 32, 8, 4096, 128, torch.float32, be))
            out.append(_case(4, 32, 8, 4096, 128, torch.float32, be, "decode vs-copy"))
            if not quick:
                out.append(_case(1, 32, 8, 4096, 128, torch.float32, be))   # split-K
                out.append(_case(4, 32, 8, 4096, 128, torch.bfloat16, be))
        else:
            for dtype in (torch.float16, torch.bfloat16):
                out.append(_case(8, 32, 8, 8192, 128, dtype, be))
                if not quick:
                    out.append(_case(1, 32, 8, 32768, 128, dtype, be))
    return out
