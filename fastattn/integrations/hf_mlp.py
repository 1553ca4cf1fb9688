"""Gated (SwiGLU) MLPs of Hugging Face models on fastattn's fused swiglu kernel.

The MLP classes listed here have, in the installed transformers (checked per class in
models/<family>/modeling_<family>.py), exactly

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

with act_fn = ACT2FN[config.hidden_act]. When that activation is SiLU (hidden_act "silu" or
"swish": transformers' SiLUActivation or nn.SiLU), patch() switches the module to a subclass
whose forward is `down_proj(fastattn.swiglu(gate_proj(x), up_proj(x)))`: one fused pass
instead of silu, then a multiply (and one fused backward), with the very same submodules and
Parameter objects (state_dict, optimizers and hooks on the projections carry over). Gemma's
MLP has the same forward with gelu_tanh: it is left alone, as is any MLP whose act_fn is not
SiLU (with a warning) or that has hooks on itself or its act_fn (a hook on act_fn would no
longer run).
"""

from torch import nn

from .. import functional as _functional
from ._subclass import has_hooks, subclass_with_forward

KNOWN_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
SILU_NAMES = ("silu", "swish")


def is_known_mlp(module):
    return (type(module).__name__ in KNOWN_MLPS
            and type(module).__module__.startswith("transformers.models."))


def _silu_classes():
    classes = [nn.SiLU]
    try:
        from transformers.activations import SiLUActivation
        classes.append(SiLUActivation)
    except ImportError:        # older transformers: ACT2FN["silu"] is nn.SiLU
        pass
    return tuple(classes)


def _forward(self, x):
    return self.down_proj(_functional.swiglu(self.gate_proj(x), self.up_proj(x)))


def fast_mlp_class(cls):
    """The subclass of an HF gated-MLP class whose forward runs the swiglu kernel."""
    return subclass_with_forward(
        cls, lambda _: _forward,
        f"{cls.__name__} whose silu(gate) * up runs on fastattn.swiglu.", __name__)


def convert_mlp(module):
    """Switch `module` (a known HF gated MLP) to its swiglu subclass, in place:
    (module, None), or (None, reason) when it cannot be represented."""
    if has_hooks(module):
        return None, "it has hooks registered"
    act = getattr(module, "act_fn", None)
    if type(act) not in _silu_classes():
        return None, (f"its activation is {type(act).__name__}, not SiLU (fastattn fuses "
                      f"silu(gate) * up only)")
    if has_hooks(act):
        return None, "its act_fn has hooks registered, which the fused forward would skip"
    hidden_act = getattr(getattr(module, "config", None), "hidden_act", "silu")
    if hidden_act not in SILU_NAMES:
        return None, f"config.hidden_act is {hidden_act!r}, not silu"
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(module, name, None), nn.Module):
            return None, f"it has no {name} module"
    module.__class__ = fast_mlp_class(type(module))
    return module, None
