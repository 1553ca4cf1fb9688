"""torch.library custom ops of fastattn (registered on import), one file per op family."""

from . import attention, norms, rotary, softmax  # noqa: F401
