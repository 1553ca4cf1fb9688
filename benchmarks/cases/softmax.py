"""Softmax cases: fastattn.softmax against torch.softmax over the last dim."""

import torch

from .common import Case, Pair, direct, element_size, fastattn_on, randn


def _case(m, n, dtype, direction, backend):
    def build(device):
        import fastattn
        x = randn((m, n), dtype, device, direction != "fwd", 1)
        return Pair(fastattn_on(backend, direct(lambda t: fastattn.softmax(t, -1), (x,),
                                                direction)),
                    direct(lambda t: torch.softmax(t, -1), (x,), direction))
    # fwd reads x, writes y; backward reads y and dy, writes dx.
    passes = 2 if direction == "fwd" else 5
    return Case(op="softmax", shape={"M": m, "N": n}, dtype=dtype, direction=direction,
                backend=backend, baseline="torch.softmax", build=build,
                flops=5.0 * m * n, bytes=passes * m * n * element_size(dtype), bound="memory")


def cases(device_type, quick, backends):
    out = []
    for be in backends:
        if device_type == "cpu":
            shapes = [(4096, 1024)] if quick else [(4096, n) for n in (128, 512, 1024, 4096)]
            dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
        else:
            shapes = [(16384, 4096)] if quick else [(16384, n) for n in (512, 1024, 4096, 16384)]
            dtypes = [torch.float16, torch.bfloat16, torch.float32]
        main = (4096, 1024) if device_type == "cpu" else (16384, 4096)
        for dtype in dtypes:
            for m, n in shapes:
                if dtype != dtypes[0] and (m, n) != main:
                    continue   # other dtypes only at the main shape
                for direction in ("fwd", "fwd+bwd"):
                    out.append(_case(m, n, dtype, direction, be))
    return out
