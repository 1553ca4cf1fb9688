"""LayerNorm and RMSNorm cases: fastattn.layer_norm / rms_norm against F.layer_norm /
F.rms_norm, with an affine weight (and bias for LayerNorm)."""

import torch
import torch.nn.functional as F

from .common import Case, Pair, direct, element_size, fastattn_on, randn


def _case(op, m, n, dtype, direction, backend):
    def build(device):
        import fastattn
        grad = direction != "fwd"
        x = randn((m, n), dtype, device, grad, 1)
        w = (1 + 0.1 * randn((n,), dtype, device, False, 2)).requires_grad_(grad)
        if op == "layer_norm":
            b = randn((n,), dtype, device, grad, 3)
            inputs = (x, w, b)
            ours = lambda x, w, b: fastattn.layer_norm(x, (n,), w, b)   # noqa: E731
            ref = lambda x, w, b: F.layer_norm(x, (n,), w, b)           # noqa: E731
        else:
            inputs = (x, w)
            ours = lambda x, w: fastattn.rms_norm(x, (n,), w)           # noqa: E731
            ref = lambda x, w: F.rms_norm(x, (n,), w)                   # noqa: E731
        return Pair(fastattn_on(backend, direct(ours, inputs, direction)),
                    direct(ref, inputs, direction))
    passes = 2 if direction == "fwd" else 5   # fwd: x in, y out; bwd: x, dy in, dx out
    return Case(op=op, shape={"M": m, "N": n}, dtype=dtype, direction=direction,
                backend=backend, baseline="F.layer_norm" if op == "layer_norm" else "F.rms_norm",
                build=build, flops=8.0 * m * n, bytes=passes * m * n * element_size(dtype),
                bound="memory")


def cases(op, device_type, quick, backends):
    out = []
    for be in backends:
        if device_type == "cpu":
            hidden = (1024,) if quick else (256, 1024, 4096)
            m = 4096
            dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
        else:
            hidden = (4096,) if quick else (1024, 4096, 8192)
            m = 16384
            dtypes = [torch.float16, torch.bfloat16, torch.float32]
        main = hidden[len(hidden) // 2]
        for dtype in dtypes:
            for n in hidden:
                if dtype != dtypes[0] and n != main:
                    continue   # other dtypes only at the main shape
                for direction in ("fwd", "fwd+bwd"):
                    out.append(_case(op, m, n, dtype, direction, be))
    return out
