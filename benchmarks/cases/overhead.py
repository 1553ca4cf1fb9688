"""Per-call overhead: tiny inputs where the Python layers above a kernel, not the kernel, set
the time. fastattn's public function (validation, backend choice, op call) against the
PyTorch call it replaces, on the default backend as a user calls it (no use_backend() block
around the call; the runner still checks that the compiled kernel ran). Issue #13's bar: each
within 1.5x of PyTorch's time, i.e. a speedup >= 0.67; the gate holds these cases to their
baseline (the bar is not met yet: README, Benchmarks)."""

import torch
import torch.nn.functional as F

from .common import Case, Pair, direct, element_size, randn


def _softmax(device_type, backend):
    def build(device):
        import fastattn
        x = randn((4, 64), torch.float32, device, False, 1)
        return Pair(direct(lambda t: fastattn.softmax(t, -1), (x,), "fwd"),
                    direct(lambda t: torch.softmax(t, -1), (x,), "fwd"))
    return Case(op="overhead", variant="softmax", shape={"M": 4, "N": 64},
                dtype=torch.float32, direction="fwd", backend=backend, baseline="torch.softmax",
                build=build, flops=5.0 * 4 * 64, bytes=2 * 4 * 64 * 4, bound="memory")


def _rms_norm(device_type, backend):
    def build(device):
        import fastattn
        x = randn((1, 512), torch.float32, device, False, 2)
        w = randn((512,), torch.float32, device, False, 3)
        return Pair(direct(lambda t, g: fastattn.rms_norm(t, (512,), g), (x, w), "fwd"),
                    direct(lambda t, g: F.rms_norm(t, (512,), g), (x, w), "fwd"))
    return Case(op="overhead", variant="rms_norm", shape={"M": 1, "N": 512},
                dtype=torch.float32, direction="fwd", backend=backend, baseline="F.rms_norm",
                build=build, flops=4.0 * 512, bytes=3 * 512 * 4, bound="memory")


def _decode(device_type, backend):
    b, h, s, d = 1, 8, 256, 64

    def build(device):
        import fastattn
        q = randn((b, h, 1, d), torch.float32, device, False, 4)
        k = randn((b, h, s, d), torch.float32, device, False, 5)
        v = randn((b, h, s, d), torch.float32, device, False, 6)
        return Pair(direct(fastattn.scaled_dot_product_attention, (q, k, v), "fwd"),
                    direct(F.scaled_dot_product_attention, (q, k, v), "fwd"))
    return Case(op="overhead", variant="decode", shape={"B": b, "H": h, "Sq": 1, "Sk": s, "D": d},
                dtype=torch.float32, direction="fwd", backend=backend,
                baseline="F.scaled_dot_product_attention", build=build,
                flops=4.0 * b * h * s * d, bytes=2 * b * h * s * d * element_size(torch.float32),
                bound="memory")


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rotary_qk(device_type, backend):
    """One decode step's q/k rotation as transformers' Llama makes it: q (4, 8, 1, 64), k
    (4, 2, 1, 64), a position per batch row, against modeling_llama's apply_rotary_pos_emb."""
    b, h, hkv, d, rows = 4, 8, 2, 64, 2048

    def build(device):
        import fastattn
        q = randn((b, h, 1, d), torch.float32, device, False, 7)
        k = randn((b, hkv, 1, d), torch.float32, device, False, 8)
        cos, sin = fastattn.rotary_cache(rows, d, device=device)
        positions = torch.full((b, 1), 517, dtype=torch.int64, device=device)
        cos_hf = torch.cat((cos, cos), -1)[positions].unsqueeze(1)     # (B, 1, 1, D)
        sin_hf = torch.cat((sin, sin), -1)[positions].unsqueeze(1)

        def ours(q, k):
            return fastattn.apply_rotary_qk(q, k, cos, sin, seq_dim=2, positions=positions)

        def theirs(q, k):
            return (q * cos_hf + _rotate_half(q) * sin_hf,
                    k * cos_hf + _rotate_half(k) * sin_hf)
        return Pair(direct(ours, (q, k), "fwd"), direct(theirs, (q, k), "fwd"))
    return Case(op="overhead", variant="rotary_qk", shape={"B": b, "H": h, "Hkv": hkv, "D": d},
                dtype=torch.float32, direction="fwd", backend=backend,
                baseline="transformers apply_rotary_pos_emb", build=build,
                flops=6.0 * b * (h + hkv) * d, bytes=2 * b * (h + hkv) * d * 4, bound="memory")


def _kvcache_decode(device_type, backend):
    """One decode step's attention as transformers makes it: q (4, 8, 1, 64) against a
    (4, 2, 512, 64) cache held in a larger buffer (fastattn reads it through a (B, S, Hkv, D)
    view), against SDPA with enable_gqa on the same views."""
    b, h, hkv, s, d = 4, 8, 2, 512, 64

    def build(device):
        import fastattn
        q = randn((b, h, 1, d), torch.float32, device, False, 9)
        kbuf = randn((b, hkv, 2 * s, d), torch.float32, device, False, 10)
        vbuf = randn((b, hkv, 2 * s, d), torch.float32, device, False, 11)
        k, v = kbuf[:, :, :s], vbuf[:, :, :s]

        def ours(q, k, v):
            return fastattn.kvcache_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), cache_seqlens=s).transpose(1, 2)

        def theirs(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return Pair(direct(ours, (q, k, v), "fwd"), direct(theirs, (q, k, v), "fwd"))
    return Case(op="overhead", variant="kvcache",
                shape={"B": b, "H": h, "Hkv": hkv, "S": s, "D": d},
                dtype=torch.float32, direction="fwd", backend=backend,
                baseline="F.scaled_dot_product_attention(enable_gqa=True)", build=build,
                flops=4.0 * b * h * s * d, bytes=2 * b * hkv * s * d * 4, bound="memory")


def cases(device_type, quick, backends):
    if device_type != "cpu":
        return []           # a CPU measurement: on a GPU the launch, not Python, dominates
    return [make(device_type, be) for be in backends if be == "cpu"
            for make in (_softmax, _rms_norm, _decode, _rotary_qk, _kvcache_decode)]
