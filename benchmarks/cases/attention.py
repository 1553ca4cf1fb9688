"""Attention cases: fastattn.scaled_dot_product_attention against F.scaled_dot_product_attention
(and flash_attn_func on CUDA when flash-attn is installed)."""

import torch
import torch.nn.functional as F

from .common import Case, Pair, direct, fastattn_on, randn

SDPA = "F.scaled_dot_product_attention"


def attention_flops(b, h, s, d, causal, direction):
    pairs = s * (s + 1) / 2 if causal else s * s          # visible (query, key) pairs
    fwd = 4.0 * b * h * pairs * d                          # QK^T and PV
    return fwd if direction == "fwd" else 3.5 * fwd        # backward: 5 matmuls vs 2


def _builder(b, h, s, d, dtype, causal, direction, backend, baseline):
    def build(device):
        import fastattn
        grad = direction != "fwd"
        q, k, v = (randn((b, h, s, d), dtype, device, grad, seed) for seed in (1, 2, 3))

        def ours(q, k, v):
            return fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        if baseline == "flash_attn_func":
            from flash_attn import flash_attn_func

            def sdpa(q, k, v):  # flash-attn takes (B, S, H, D)
                o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    causal=causal)
                return o.transpose(1, 2)
        return Pair(fastattn_on(backend, direct(ours, (q, k, v), direction)),
                    direct(sdpa, (q, k, v), direction))
    return build


def _case(b, h, s, d, dtype, causal, direction, backend, baseline=SDPA):
    elt = torch.empty((), dtype=dtype).element_size()
    return Case(op="attention", variant="causal" if causal else "full",
                shape={"B": b, "H": h, "S": s, "D": d}, dtype=dtype, direction=direction,
                backend=backend, baseline=baseline,
                build=_builder(b, h, s, d, dtype, causal, direction, backend, baseline),
                flops=attention_flops(b, h, s, d, causal, direction),
                bytes=4.0 * b * h * s * d * elt, bound="compute")


def _flash_attn_installed():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def cases(device_type, quick, backends):
    out = []
    if device_type == "cpu":
        main = (4, 8, 512, 64)
        for be in backends:
            out += [_case(*main, torch.float32, True, "fwd", be),
                    _case(*main, torch.float32, False, "fwd", be),
                    _case(*main, torch.float32, True, "fwd+bwd", be)]
            if quick:
                continue
            out.append(_case(*main, torch.float32, False, "fwd+bwd", be))
            # Sequence sweep at ~2k tokens per batch (B=4 up to S=512).
            for s in (128, 1024, 2048, 4096):
                b = 4 if s <= 512 else max(1, 2048 // s)
                for causal in (True, False):
                    out.append(_case(b, 8, s, 64, torch.float32, causal, "fwd", be))
                if s <= 2048:
                    out.append(_case(b, 8, s, 64, torch.float32, True, "fwd+bwd", be))
            for d in (32, 128):                               # head-dim (hidden size) sweep
                out.append(_case(4, 8, 512, d, torch.float32, True, "fwd", be))
            out.append(_case(*main, torch.bfloat16, True, "fwd", be))
        return out
    baselines = [SDPA] + (["flash_attn_func"] if _flash_attn_installed() else [])
    seqs = (1024, 4096) if quick else (128, 512, 1024, 2048, 4096)
    dims = (128,) if quick else (64, 128)
    for be in backends:
        for dtype in (torch.float16,) if quick else (torch.float16, torch.bfloat16):
            for s in seqs:
                for d in dims:
                    b, h = max(1, 16384 // s), 2048 // d
                    for causal in (True, False):
                        for direction in ("fwd", "fwd+bwd"):
                            for base in baselines:
                                out.append(_case(b, h, s, d, dtype, causal, direction, be, base))
    return out
