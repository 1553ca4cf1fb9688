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


def cases(device_type, quick, backends):
    if device_type != "cpu":
        return []           # a CPU measurement: on a GPU the launch, not Python, dominates
    return [make(device_type, be) for be in backends if be == "cpu"
            for make in (_softmax, _rms_norm, _decode)]
