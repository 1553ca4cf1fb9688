"""Drop-in modules on fastattn's kernels and patch(model), which installs them."""

from .mha import MultiHeadAttention
from .layer_norm import LayerNorm, RMSNorm
from .patch import patch
from .rotary import RotaryEmbedding

__all__ = ["MultiHeadAttention", "LayerNorm", "RMSNorm", "RotaryEmbedding", "patch"]
