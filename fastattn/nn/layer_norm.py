"""LayerNorm and RMSNorm: nn.LayerNorm / nn.RMSNorm with the forward on fastattn's kernels.

Subclasses, so the constructor, parameters, state_dict, extra_repr and isinstance checks of
code written for the PyTorch modules all hold.
"""

import torch.nn as nn

from .. import functional as F


class LayerNorm(nn.LayerNorm):
    """Drop-in for nn.LayerNorm on fastattn.layer_norm (fused kernel, fp32 statistics)."""

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """Drop-in for nn.RMSNorm on fastattn.rms_norm (eps=None: finfo(input.dtype).eps)."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
