"""Linear cases: fastattn.linear(x, weight) against F.linear(x, weight) on the linear layers
of a decode step: x (M, K) with M = 1, 4 or 16 rows (batch x new tokens; bf16 up to 4, the cpu
kernel's limit there), weight (N, K), no
bias (Llama's projections), fp32 and bf16. Shapes (N, K) of a Llama-style model of hidden size
512 (MLP up/gate (1376, 512), down (512, 1376), q/o (512, 512), k/v with 2 KV heads
(128, 512)) and a 7B-sized (4096, 4096).

Weights out of cache: one weight called over and over stays in L2/L3 (a (512, 512) fp32
weight is 1 MiB) and times a cache-resident GEMV, which is not what decoding does: a model's
layers each read their own weights once per step, and a step reads all of them from memory.
So one timed call runs the linear on W distinct weights of the shape, one after the other
(views of one (W, N, K) tensor), as a model's stack of layers does; both sides run the same
weights in the same order and return the W outputs, which the runner compares. The weights
hold at least 256 MiB and twice the last-level cache the OS reports (sysfs), so that cycling
through them misses the cache on every call: 48 MiB is not enough everywhere. On the 2-vCPU
machine this was written on (sysfs: a 480 MiB L3) a sum over 48 MiB read at ~55 GB/s and over
192 MiB or more at ~25 GB/s: 48 MiB of weights stayed in cache. W is in the baseline's text
(it depends on the machine); the rate is over all W weights (bytes: the weights read once,
plus x and y). Memory-bound: with M <= 16 rows reading the weight is the cost (the cpu
kernel's reason to exist, csrc/cpu/linear.cpp). Forward only (decode runs without autograd).
"""

import functools
import glob
import math

import torch
import torch.nn.functional as F

from .common import Case, Pair, element_size, fastattn_on, forward_only, randn

# The weights one call reads: at least this, and twice the last-level cache (see above).
MIN_WEIGHT_BYTES = 256 << 20


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes():
    """The largest cache of CPU 0 the OS reports (Linux sysfs), or 0 when it reports none."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text and text[-1] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=0)


def weight_bytes():
    return max(MIN_WEIGHT_BYTES, 2 * last_level_cache_bytes())


# (out_features N, in_features K)
SHAPES = ((1376, 512), (512, 1376), (512, 512), (128, 512), (4096, 4096))
ROWS = (1, 4, 16)


def rows_for(dtype):
    """The row counts measured in `dtype`: ROWS up to the cpu kernel's limit for it (16 fp32,
    4 bf16: fastattn/_C_ops.py's LINEAR_MAX_ROWS; more rows run on ATen's GEMM under auto)."""
    from fastattn import _C_ops
    return tuple(m for m in ROWS if m <= _C_ops.linear_max_rows(dtype))


def layers(n, k, dtype):
    """Distinct weights per call: enough to hold weight_bytes()."""
    return max(1, math.ceil(weight_bytes() / (n * k * element_size(dtype))))


def _case(m, n, k, dtype, backend):
    w_count = layers(n, k, dtype)

    def build(device):
        import fastattn
        x = randn((m, k), dtype, device, False, 1)
        # W distinct weights: one random weight (scaled like nn.Linear's init) times
        # 1 + i / W (a copy per layer, cheaper than W random draws of up to a GiB)
        base = randn((n, k), torch.float32, device, False, 2) * k ** -0.5
        stacked = torch.empty((w_count, n, k), dtype=dtype, device=device)   # (W, N, K)
        for i in range(w_count):
            stacked[i].copy_(base * (1 + i / w_count))
        weights = list(stacked.unbind(0))

        def stack(fn):
            def run(x):                               # one decode step's pass over the weights
                return [fn(x, w) for w in weights]
            return run
        return Pair(fastattn_on(backend, forward_only(stack(fastattn.linear), (x,))),
                    forward_only(stack(F.linear), (x,)))

    esize = element_size(dtype)
    return Case(op="linear", variant="decode", shape={"M": m, "N": n, "K": k},
                dtype=dtype, direction="fwd", backend=backend,
                baseline=f"F.linear (over {w_count} distinct weights per call)", build=build,
                flops=2.0 * m * n * k * w_count,
                bytes=float(w_count * (n * k + m * k + m * n) * esize), bound="memory")


def cases(device_type, quick, backends):
    out = []
    if device_type != "cpu":
        return out                 # no CUDA or Triton linear kernel: cuBLAS is the GEMM there
    for be in backends:
        shapes = [(1376, 512)] if quick else SHAPES
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
        for dtype in dtypes:
            for n, k in shapes:
                for m in rows_for(dtype):
                    out.append(_case(m, n, k, dtype, be))
    return out
