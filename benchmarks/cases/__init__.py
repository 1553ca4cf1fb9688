"""The benchmark cases of every op, for the pytest microbenchmarks, the CLI and the gate."""

from . import (attention, hf, kvcache, layer_norm, linear, mha, overhead, rotary,  # noqa: F401
               softmax, swiglu, varlen)

OPS = ("attention", "softmax", "layer_norm", "rms_norm", "rotary", "swiglu", "linear", "mha",
       "varlen", "kvcache", "overhead")
# Whole-model cases (minutes each), only when asked for by name: --ops hf
MODEL_OPS = ("hf",)


def default_backends(device_type):
    """The fastattn backends worth timing on a device: the compiled kernels, never the torch
    reference (that is the thing being replaced) nor the Triton interpreter on CPU."""
    return ["cpu"] if device_type == "cpu" else ["triton", "cuda"]


def build_cases(device_type, quick=False, ops=OPS, backends=None):
    backends = backends or default_backends(device_type)
    out = []
    for op in ops:
        if op in ("layer_norm", "rms_norm"):
            out += layer_norm.cases(op, device_type, quick, backends)
        elif op in OPS or op in MODEL_OPS:
            out += globals()[op].cases(device_type, quick, backends)
        else:
            raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS + MODEL_OPS)}")
    return out
