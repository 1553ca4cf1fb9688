"""What a benchmark case is, and the helpers every op's case module shares.

A Case names one measurement (op x shape x dtype x direction x backend) and knows how to build
a pair of callables on fresh inputs: the fastattn one (run on an explicitly chosen backend, so
a missing kernel raises instead of silently timing the torch fallback) and its PyTorch
counterpart. Both callables return tensors so the runner can compare their results.
"""

import dataclasses
from typing import Callable, Optional

import torch

DIRECTIONS = ("fwd", "fwd+bwd")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass
class Pair:
    fastattn: Callable[[], object]
    torch: Callable[[], object]


@dataclasses.dataclass
class Case:
    op: str                       # attention, softmax, layer_norm, rms_norm, rotary, mha
    shape: dict                   # named sizes, e.g. {"B": 4, "H": 8, "S": 512, "D": 64}
    dtype: torch.dtype
    direction: str                # "fwd" or "fwd+bwd"
    backend: str                  # the fastattn backend timed
    baseline: str                 # the PyTorch counterpart, e.g. "F.scaled_dot_product_attention"
    build: Callable[[torch.device], Pair] = dataclasses.field(repr=False)
    variant: str = ""             # e.g. "causal"; part of the case id
    flops: float = 0.0            # useful floating point operations per call
    bytes: float = 0.0            # minimum bytes moved per call (memory-bound ops)
    bound: str = "memory"         # "compute": rate in GFLOP/s; "memory": rate in GB/s
    compare_tol: Optional[float] = None    # scaled-difference bound (None: by dtype, runner.py)

    @property
    def shape_str(self):
        return ",".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def dtype_name(self):
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).replace("torch.", ""))

    @property
    def id(self):
        parts = [self.op, self.variant, self.shape_str, self.dtype_name, self.direction,
                 self.backend]
        return "/".join(p for p in parts if p)


def fastattn_on(backend, fn):
    """fn run with fastattn's backend pinned (entered per call: a contextvar, microseconds)."""
    import fastattn

    def call():
        with fastattn.use_backend(backend):
            return fn()
    return call


def forward_backward(fn, inputs, seed=0):
    """A callable running fn(*inputs) and its backward for a fixed random output gradient;
    returns (output, *input grads). Uses autograd.grad so nothing accumulates between calls."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    state = {}

    def call():
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        if "grad" not in state:
            g = torch.Generator(device="cpu").manual_seed(seed)
            state["grad"] = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
        grads = torch.autograd.grad(out, leaves, state["grad"])
        return (out.detach(), *grads)
    return call


def forward_only(fn, inputs):
    def call():
        with torch.no_grad():
            out = fn(*inputs)
        return out[0] if isinstance(out, tuple) else out
    return call


def direct(fn, inputs, direction):
    return forward_only(fn, inputs) if direction == "fwd" else forward_backward(fn, inputs)


def randn(shape, dtype, device, requires_grad, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def element_size(dtype):
    return torch.empty((), dtype=dtype).element_size()
