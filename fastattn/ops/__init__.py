"""fastattn's registered ops (torch.ops.fastattn.*): one file per op, one op per public operation
and direction, each with its fake and autograd registered once (docs/architecture.md)."""

from . import (attention, attention_weights, kvcache_attention, layer_norm,  # noqa: F401
               linear, merge_attention_states, rotary, softmax, swiglu, varlen_attention)
