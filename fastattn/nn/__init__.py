"""Drop-in modules on fastattn's kernels and patch(model), which installs them."""

from .attention import MultiHeadAttention
from .norms import LayerNorm, RMSNorm
from .patch import patch
from .rotary import RotaryEmbedding

__all__ = ["MultiHeadAttention", "LayerNorm", "RMSNorm", "RotaryEmbedding", "patch"]
