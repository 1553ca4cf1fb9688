"""fastattn.patch(model) for Hugging Face transformers models (called by fastattn.nn.patch).

What it changes, in place:
  attention  registers "fastattn" and calls model.set_attn_implementation("fastattn");
  norms      the family's RMSNorm modules become HFRMSNorm (hf_norms.py; same Parameter
             objects); nn.LayerNorm (GPT-2, GPT-NeoX) is handled by the generic patch;
  rotary     the family's rotary embedding runs on the rotary kernel (hf_rotary.py);
  cache      the DynamicCache that model.generate builds for itself appends in place instead
             of concatenating every step (hf_cache.py), with attention;
  mlp        the family's gated SiLU MLPs (LlamaMLP, Mistral, Qwen2/3) run silu(gate) * up on
             the fused swiglu kernel (hf_mlp.py; same submodules and Parameter objects);
  linear     plain nn.Linear layers (projections, lm_head) run decode-sized CPU calls on the
             skinny-GEMM kernel of fastattn.linear and everything else on F.linear as before
             (hf_linear.py; same module and Parameter objects).
Anything else (unknown norm or rotary classes, modules with hooks) is left alone with a
warning. Returns a list of (qualified name, old, new) entries for model.fastattn_patched.
"""

import warnings

from torch import nn

from . import hf_cache, hf_linear, hf_mlp, hf_norms, hf_rotary
from ._subclass import has_hooks
from .transformers import ATTN_IMPLEMENTATION, register


def _attention_modules(model):
    """The attention modules (those with a `config` that dispatch through
    ALL_ATTENTION_FUNCTIONS) found by name: every HF attention class is called *Attention."""
    return [(q, m) for q, m in model.named_modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "config")]


def _warn(qual, m, reason):
    warnings.warn(f"fastattn.patch: left {qual or 'model'} ({type(m).__name__}) unchanged: "
                  f"{reason}", stacklevel=4)


def patch_transformers_model(model, *, attention=True, norms=True, rotary=True, mlp=True,
                             linear=True):
    replaced = []
    attn_modules = _attention_modules(model)
    if attention:
        old = getattr(model.config, "_attn_implementation", None)
        register()
        if old != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
            for qual, m in attn_modules:
                replaced.append((qual, f"{type(m).__name__}[{old}]",
                                 f"{type(m).__name__}[{ATTN_IMPLEMENTATION}]"))
        if hasattr(model, "generate"):
            already = getattr(model._prepare_cache_for_generation, "_fastattn_growing", False)
            reason = hf_cache.install_generate_cache(model)
            if reason:
                _warn("generate", model, f"generate keeps transformers' cache: {reason}")
            elif not already:
                replaced.append(("generate", "DynamicCache", "GrowingCache"))

    def visit(module, prefix):
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            qual = f"{prefix}.{name}" if prefix else name
            new = child
            if norms and hf_norms.is_known_rmsnorm(child):
                if has_hooks(child):
                    _warn(qual, child, "it has hooks registered, which a new module would lose")
                else:
                    new, reason = hf_norms.convert_rmsnorm(child)
                    if new is None:
                        _warn(qual, child, reason)
                        new = child
                    else:
                        module._modules[name] = new
                        replaced.append((qual, type(child).__name__, type(new).__name__))
            elif rotary and hf_rotary.is_known_rotary(child):
                old_name = type(child).__name__
                new, reason = hf_rotary.convert_rotary(child, [m for _, m in attn_modules])
                if new is None:
                    _warn(qual, child, reason)
                    new = child
                else:
                    replaced.append((qual, old_name, type(new).__name__))
            elif mlp and hf_mlp.is_known_mlp(child):
                old_name = type(child).__name__
                new, reason = hf_mlp.convert_mlp(child)      # switches its class in place
                if new is None:
                    _warn(qual, child, reason)
                    new = child
                else:
                    replaced.append((qual, old_name, type(new).__name__))
            elif linear and hf_linear.is_plain_linear(child):
                new, reason = hf_linear.convert_linear(child)  # in place
                if new is None:
                    _warn(qual, child, reason)
                    new = child
                else:
                    replaced.append((qual, "Linear", type(new).__name__))
            elif (norms and type(child).__name__.endswith("RMSNorm")
                  and type(child).__module__.startswith("transformers.")):
                _warn(qual, child, "fastattn does not know this RMSNorm variant's weight "
                                   "convention")
            elif (rotary and type(child).__name__.endswith("RotaryEmbedding")
                  and type(child).__module__.startswith("transformers.")
                  and not type(child).__module__.startswith(hf_rotary.__name__)):
                _warn(qual, child, "fastattn does not know this rotary layout (model-specific "
                                   "ropes keep HF's code)")
            if new is child:
                visit(child, qual)

    visit(model, "")
    return replaced


def is_transformers_model(model):
    from .transformers import is_transformers_model as _is
    return isinstance(model, nn.Module) and _is(model)
