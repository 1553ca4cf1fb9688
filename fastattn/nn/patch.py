"""fastattn.patch(model): swap PyTorch's attention and norm modules for fastattn's, in place."""

import logging
import sys
import warnings

import torch
import torch.nn as nn

from .mha import MultiHeadAttention
from .layer_norm import LayerNorm, RMSNorm

logger = logging.getLogger("fastattn")


def _has_hooks(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)
                or m._state_dict_hooks or m._load_state_dict_pre_hooks)


def _reuse_parameters(new, old):
    """Give `new` the very Parameter/buffer objects of `old` (optimizers keep working)."""
    for name, p in old._parameters.items():
        new._parameters[name] = p
    for name, b in old._buffers.items():
        new._buffers[name] = b
    for name, sub in old._modules.items():
        new._modules[name] = sub
    new.train(old.training)
    return new


def _convert_mha(m):
    ref = m.in_proj_weight if m._qkv_same_embed_dim else m.q_proj_weight
    new = MultiHeadAttention(m.embed_dim, m.num_heads, dropout=m.dropout,
                             bias=m.in_proj_bias is not None, add_bias_kv=m.bias_k is not None,
                             add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
                             batch_first=m.batch_first, device="meta", dtype=ref.dtype)
    return _reuse_parameters(new, m)


def _convert_layer_norm(m):
    new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                    bias=m.bias is not None, device="meta")
    return _reuse_parameters(new, m)


def _convert_rms_norm(m):
    new = RMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                  device="meta")
    return _reuse_parameters(new, m)


def _converter(m, attention, norms):
    """(converter, None) for a module to replace, (None, reason) for one to leave with a
    warning, (None, None) for one that is not ours to touch."""
    kind = type(m)
    if attention and isinstance(m, nn.MultiheadAttention):
        target, convert = nn.MultiheadAttention, _convert_mha
    elif norms and isinstance(m, nn.LayerNorm):
        target, convert = nn.LayerNorm, _convert_layer_norm
    elif norms and isinstance(m, nn.RMSNorm):
        target, convert = nn.RMSNorm, _convert_rms_norm
    else:
        return None, None
    if kind in (MultiHeadAttention, LayerNorm, RMSNorm):
        return None, None                                   # already fastattn
    if kind is not target:
        return None, f"{kind.__qualname__} subclasses {target.__name__} (its forward may differ)"
    if _has_hooks(m):
        return None, "it has hooks registered, which a new module would lose"
    return convert, None


_FASTATTN_TYPES = (MultiHeadAttention, LayerNorm, RMSNorm)


def _disable_encoder_fast_paths(root):
    """Turn off PyTorch's inference fast paths that would bypass swapped modules; returns the
    qualified names of the layers changed.

    In eval mode (or under no_grad) nn.TransformerEncoderLayer.forward hands its parameters
    straight to torch._transformer_encoder_layer_fwd and never calls self_attn / norm1 /
    norm2, and nn.TransformerEncoder turns padded input into a nested tensor for that path.
    The layer takes the fast path only when `activation_relu_or_gelu` is set (its own cache
    of "the activation is relu or gelu", read by the fast path alone); zeroing it sends the
    layer through its submodules. The encoder's `use_nested_tensor` is read only by its
    nested-tensor conversion.
    """
    changed = []
    for qual, m in root.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(
                isinstance(sub, _FASTATTN_TYPES)
                for sub in (m.self_attn, getattr(m, "norm1", None), getattr(m, "norm2", None))):
            if m.activation_relu_or_gelu:
                m.activation_relu_or_gelu = 0
                changed.append(qual or "model")
    for m in root.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(layer, nn.TransformerEncoderLayer)
                and not layer.activation_relu_or_gelu for layer in m.layers):
            m.use_nested_tensor = False
    return changed


def _is_transformers_model(model):
    if "transformers" not in sys.modules:      # never import transformers just to check
        return False
    from ..integrations.transformers import is_transformers_model
    return is_transformers_model(model)


def patch(model, *, attention=True, norms=True):
    """Replace every nn.MultiheadAttention (attention=True) and nn.LayerNorm / nn.RMSNorm
    (norms=True) in `model` with fastattn's drop-ins, in place.

    The new modules take over the old ones' Parameter objects (so weights, device, dtype,
    requires_grad and existing optimizers carry over) and their train/eval state. Modules
    that cannot be represented (subclasses, modules with hooks) are left alone with a
    warning. nn.TransformerEncoderLayer's inference fast path (eval mode / no_grad), which
    would run PyTorch's fused kernels instead of the swapped modules, is turned off on every
    layer that holds a fastattn module (and nn.TransformerEncoder's nested-tensor conversion
    with it). A Hugging Face transformers model also gets attn_implementation="fastattn" and
    fastattn's RMSNorm and rotary kernels (fastattn/integrations/hf_patch.py). Returns the
    model (the replacement itself when `model` is such a module) with
    `fastattn_patched` = list of (qualified name, old type name, new type name); the summary
    is logged on the "fastattn" logger.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    replaced, memo = [], {}
    if _is_transformers_model(model):
        # Hugging Face model: attention implementation, RMSNorms and rotary (integrations/)
        from ..integrations.hf_patch import patch_transformers_model
        replaced.extend(patch_transformers_model(model, attention=attention, norms=norms))

    def visit(module, prefix):
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            qual = f"{prefix}.{name}" if prefix else name
            new = swap(child, qual)
            if new is not child:
                module._modules[name] = new
            else:
                visit(child, qual)

    def swap(m, qual):
        if id(m) in memo:                                    # shared module: one replacement
            return memo[id(m)]
        convert, reason = _converter(m, attention, norms)
        if reason is not None:
            warnings.warn(f"fastattn.patch: left {qual or 'model'} ({type(m).__name__}) "
                          f"unchanged: {reason}", stacklevel=3)
        if convert is None:
            return m
        with torch.no_grad():
            new = convert(m)
        memo[id(m)] = new
        replaced.append((qual, type(m).__name__, type(new).__name__))
        return new

    root = swap(model, "")
    if root is model:
        visit(model, "")
    root.fastattn_patched = replaced
    fast_path_off = _disable_encoder_fast_paths(root)
    if fast_path_off:
        logger.info("fastattn.patch: turned off PyTorch's encoder fast path on %s",
                    ", ".join(fast_path_off))
    counts = {}
    for _, old, _ in replaced:
        counts[old] = counts.get(old, 0) + 1
    logger.info("fastattn.patch: replaced %d modules (%s)", len(replaced),
                ", ".join(f"{v} x {k}" for k, v in sorted(counts.items())) or "none")
    return root
