"""Rotary cases: fastattn.apply_rotary on (B, H, S, D) against the eager rotate-half formula
(fastattn.reference.rotate_half_rope, what most model code does)."""

import torch

from .common import Case, Pair, direct, element_size, fastattn_on, randn


def _case(b, h, s, d, dtype, direction, backend):
    def build(device):
        import fastattn
        from fastattn.reference import rotate_half_rope
        x = randn((b, h, s, d), dtype, device, direction != "fwd", 1)
        cos, sin = fastattn.rotary_cache(s, d, device=device, dtype=dtype)     # (S, D/2)
        cos_full, sin_full = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)  # (S, D)
        return Pair(fastattn_on(backend, direct(lambda t: fastattn.apply_rotary(t, cos, sin),
                                                (x,), direction)),
                    direct(lambda t: rotate_half_rope(t, cos_full, sin_full), (x,), direction))
    passes = 2 if direction == "fwd" else 4
    return Case(op="rotary", shape={"B": b, "H": h, "S": s, "D": d}, dtype=dtype,
                direction=direction, backend=backend, baseline="rotate_half_rope (eager)",
                build=build, flops=3.0 * b * h * s * d,
                bytes=passes * b * h * s * d * element_size(dtype), bound="memory")


def cases(device_type, quick, backends):
    out = []
    for be in backends:
        if device_type == "cpu":
            shapes = [(4, 8, 512, 64)] if quick else \
                [(4, 8, s, 64) for s in (128, 512, 2048, 4096)] + [(4, 8, 512, 128)]
            dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
        else:
            shapes = [(8, 32, 4096, 128)] if quick else \
                [(8, 32, s, 128) for s in (512, 1024, 4096)] + [(8, 32, 4096, 64)]
            dtypes = [torch.float16, torch.bfloat16, torch.float32]
        main = (4, 8, 512, 64) if device_type == "cpu" else (8, 32, 4096, 128)
        for dtype in dtypes:
            for shape in shapes:
                if dtype != dtypes[0] and shape != main:
                    continue   # other dtypes only at the main shape
                for direction in ("fwd", "fwd+bwd"):
                    out.append(_case(*shape, dtype, direction, be))
    return out
