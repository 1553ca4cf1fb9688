"""RMSNorm drop-ins for Hugging Face models on fastattn's fused kernel, with the exact math of
the classes they replace:

- Llama style (LlamaRMSNorm, Mistral, Qwen2/3, Phi-3): weight * normalize(x.float()).to(dtype).
- Gemma style (Gemma/Gemma2/Gemma3RMSNorm): (normalize(x.float()) * (1 + weight.float()))
  .type_as(x): the stored weight is zero-centred, the kernel gets 1 + weight in fp32.

The kernel normalises in fp32 and applies the weight before the single cast back (Llama's
class casts, then multiplies: identical in fp32, one rounding fewer in 16-bit types).
The module holds the very Parameter object of the module it replaces.
"""

from torch import nn

from .. import functional as _functional

# class name -> (weight offset, name of the eps attribute)
LLAMA_STYLE = {name: (0.0, "variance_epsilon") for name in (
    "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")}
GEMMA_STYLE = {name: (1.0, "eps") for name in (
    "GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")}
KNOWN_RMSNORMS = {**LLAMA_STYLE, **GEMMA_STYLE}


class HFRMSNorm(nn.Module):
    """fastattn.rms_norm with a Hugging Face RMSNorm's weight convention."""

    def __init__(self, weight, eps, weight_offset, replaces):
        super().__init__()
        self._parameters["weight"] = weight          # the same Parameter object
        self.variance_epsilon = float(eps)            # both names HF code reads
        self.eps = float(eps)
        self.weight_offset = float(weight_offset)
        self.replaces = replaces

    def forward(self, hidden_states):
        w = self.weight
        if self.weight_offset:
            w = self.weight.float() + self.weight_offset   # autograd: d/dw is the identity
        return _functional.rms_norm(hidden_states, (hidden_states.shape[-1],), w,
                                    self.variance_epsilon)

    def extra_repr(self):
        return (f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, "
                f"weight_offset={self.weight_offset}, replaces={self.replaces}")


def convert_rmsnorm(module):
    """(new module, None), or (None, reason) for a module that cannot be represented."""
    name = type(module).__name__
    offset, eps_attr = KNOWN_RMSNORMS[name]
    weight = module._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None, "it has no 1-D weight Parameter"
    if set(module._parameters) != {"weight"} or module._buffers or module._modules:
        return None, "it holds state beyond its weight"
    eps = getattr(module, eps_attr, None)
    if not isinstance(eps, (int, float)):
        return None, f"it has no numeric {eps_attr}"
    new = HFRMSNorm(weight, eps, offset, name)
    new.train(module.training)
    return new, None


def is_known_rmsnorm(module):
    return type(module).__name__ in KNOWN_RMSNORMS and type(module).__module__.startswith(
        "transformers.")

