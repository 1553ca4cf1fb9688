"""The nn.Linear layers of Hugging Face models on fastattn's skinny-GEMM kernel at decode.

A decode step multiplies a few rows (batch x new tokens) by every weight of the model: the
linear layers are then bound by reading their weights, which a BLAS GEMM does twice (it packs
the weight on every call). patch() switches each plain nn.Linear to a subclass whose forward
first offers the call to fastattn.linear's eager fast path (csrc/eager.cpp): plain CPU tensors
that need no gradient, at most 16 rows (fp32; 8 fp16, 4 bf16), backend cpu or auto, not compiling. The kernel reads
the weight once (fp32 accumulation). Every other call (prefill and training-sized inputs,
gradients, CUDA, another backend, torch.compile) is nn.Linear's own F.linear, unchanged.

The module keeps its Parameter objects (state_dict, optimizers, tied weights such as lm_head's
carry over). Only exact nn.Linear modules without hooks are switched: subclasses (quantized
layers and the like) and hooked modules are left alone, and transformers' Conv1D (GPT-2's
projections, a transposed weight the kernel would have to copy on every call) is not a Linear.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .. import _eager
from ._subclass import has_hooks, subclass_with_forward


def _forward(self, input):
    if not torch.compiler.is_compiling():
        out = _eager.linear(input, self.weight, self.bias)   # None unless a decode-sized call
        if out is not None:
            return out
    return F.linear(input, self.weight, self.bias)


def is_plain_linear(module):
    return type(module) is nn.Linear


def fast_linear_class():
    return subclass_with_forward(
        nn.Linear, lambda _: _forward,
        "nn.Linear whose decode-sized CPU calls run fastattn.linear's skinny-GEMM kernel.",
        __name__)


def convert_linear(module):
    """Switch `module` (an exact nn.Linear) to the fast subclass, in place: (module, None), or
    (None, reason)."""
    if has_hooks(module):
        return None, "it has hooks registered"
    module.__class__ = fast_linear_class()
    return module, None
