"""SwiGLU cases: fastattn.swiglu(gate, up) against F.silu(gate) * up (the gated MLP's
activation: (tokens, intermediate size) tensors)."""

import torch
import torch.nn.functional as F

from .common import Case, Pair, direct, element_size, fastattn_on, randn


def _case(m, n, dtype, direction, backend):
    def build(device):
        import fastattn
        grad = direction != "fwd"
        gate = randn((m, n), dtype, device, grad, 1)
        up = randn((m, n), dtype, device, grad, 2)
        return Pair(fastattn_on(backend, direct(fastattn.swiglu, (gate, up), direction)),
                    direct(lambda g, u: F.silu(g) * u, (gate, up), direction))
    # fwd reads gate and up, writes out; bwd reads dy, gate and up, writes dgate and dup.
    passes = 3 if direction == "fwd" else 8
    flops = 5.0 if direction == "fwd" else 15.0
    return Case(op="swiglu", shape={"M": m, "N": n}, dtype=dtype, direction=direction,
                backend=backend, baseline="F.silu(gate) * up", build=build,
                flops=flops * m * n, bytes=passes * m * n * element_size(dtype), bound="memory")


def cases(device_type, quick, backends):
    out = []
    for be in backends:
        if device_type == "cpu":
            # (tokens, intermediate): one decode step of a 7B model, a 2k-token Llama-1B prefill
            shapes = [(2048, 1376)] if quick else [(4, 11008), (2048, 1376), (4096, 4096)]
            dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
        else:
            shapes = [(16384, 4096)] if quick else [(16384, n) for n in (2816, 4096, 11008)]
            dtypes = [torch.float16, torch.bfloat16, torch.float32]
        main = (2048, 1376) if device_type == "cpu" else (16384, 4096)
        for dtype in dtypes:
            for m, n in shapes:
                if dtype != dtypes[0] and (m, n) != main:
                    continue   # other dtypes only at the main shape
                for direction in ("fwd", "fwd+bwd"):
                    out.append(_case(m, n, dtype, direction, be))
    return out
