"""fastattn: fused attention, softmax, LayerNorm/RMSNorm and RoPE kernels behind drop-in
PyTorch modules.

Backends: `triton` (CUDA), `cuda` and `cpu` (the C++/CUDA extension fastattn._C), `torch`
(plain PyTorch reference). Choose with `fastattn.use_backend(name)` or $FASTATTN_BACKEND;
the default `auto` picks the fastest backend that supports the call.
"""

from . import _compat  # noqa: F401  (first: a clear error on an unsupported torch)
from ._backend import available_backends, record_dispatch, use_backend
from ._ext import build_info
from .attention_lse import (attention_backward_with_lse, attention_forward_with_lse,
                            merge_attention_states)
from .functional import (apply_rotary, apply_rotary_qk, layer_norm, linear, rms_norm,
                         rotary_cache, scaled_dot_product_attention, softmax, swiglu)
from .kvcache import kvcache_attention
from .nn import LayerNorm, MultiHeadAttention, RMSNorm, RotaryEmbedding, patch
from .varlen import varlen_attention

__version__ = "0.1.0"

__all__ = [
    "MultiHeadAttention", "LayerNorm", "RMSNorm", "RotaryEmbedding", "patch",
    "scaled_dot_product_attention", "softmax", "layer_norm", "rms_norm", "apply_rotary",
    "apply_rotary_qk", "rotary_cache", "use_backend", "available_backends", "record_dispatch",
    "build_info", "varlen_attention", "kvcache_attention", "attention_forward_with_lse",
    "attention_backward_with_lse", "merge_attention_states", "swiglu", "linear",
]
