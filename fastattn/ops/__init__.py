"""torch.library custom ops of fastattn (registered on import), one file per op family."""

from . import attention, norms, rotary, softmax, varlen_attention  # noqa: F401
