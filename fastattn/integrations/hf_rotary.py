"""Rotary embeddings of Hugging Face models on fastattn's rotary kernel.

Two layouts:
  NeoX (Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-NeoX, ...): rotate halves, described below.
  GPT-J (interleaved pairs): GPTJRotaryEmbedding returns (sin, cos), each (B, S, R/2) already
    compact, and modeling_gptj's `apply_rotary_pos_emb(tensor, sin, cos)` rotates one
    (B, S, H, R) tensor (q or k before the head transpose, the first rotary_dim features);
    the same two steps move it onto the kernel with interleaved=True.

HF models compute (cos, sin) once per forward in a `<Family>RotaryEmbedding` module, shape
(B or 1, S, R) in NeoX layout (the R/2 frequencies twice), and every attention layer calls its
modeling file's `apply_rotary_pos_emb(q, k, cos, sin)` with q (B, H, S, D), rotating the
first R features (R < D: partial rotary, Phi-3 / GPT-NeoX).

patch() keeps HF's own cos/sin computation (so every rope type: default, linear, dynamic,
yarn, llama3, longrope and attention_scaling, is exact by construction) and only moves the
rotation onto the kernel:
  1. the model's rotary-embedding module becomes a subclass whose forward also attaches the
     compact tables to the returned cos: table (N, R/2) = cos[..., :R/2] per (b, s) token and
     positions (B, S), the kernel's per-token position argument (rows differ per batch entry
     for left-padded batches and packed sequences);
  2. the family's `apply_rotary_pos_emb` global is wrapped once: a cos carrying the tables
     goes to fastattn.apply_rotary_qk (one kernel, autograd through the kernel), any other cos
     (an unpatched model of the same family) to HF's original function.
"""

import sys

import torch

from .. import functional as _functional
from ._subclass import subclass_with_forward

# Rotary-embedding classes whose cos/sin use NeoX layout and whose family's
# apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) rotates cos.shape[-1] features.
KNOWN_ROTARY = ("LlamaRotaryEmbedding", "MistralRotaryEmbedding", "Qwen2RotaryEmbedding",
                "Qwen3RotaryEmbedding", "GemmaRotaryEmbedding", "Gemma2RotaryEmbedding",
                "Gemma3RotaryEmbedding", "Phi3RotaryEmbedding", "GPTNeoXRotaryEmbedding")

# GPT-J layout: the rotary module returns (sin, cos), compact (B, S, R/2); the family's
# apply_rotary_pos_emb(tensor, sin, cos) rotates adjacent pairs of one (B, S, H, R) tensor.
KNOWN_INTERLEAVED_ROTARY = ("GPTJRotaryEmbedding",)

_TABLES = "_fastattn_rope_tables"


def is_known_rotary(module):
    return ((type(module).__name__ in KNOWN_ROTARY
             or type(module).__name__ in KNOWN_INTERLEAVED_ROTARY)
            and type(module).__module__.startswith("transformers."))


def _is_interleaved(cls):
    return cls.__name__ in KNOWN_INTERLEAVED_ROTARY


def _attach_tables(cos, sin, compact=False):
    """Attach (cos table, sin table, positions) to cos; cos/sin (Bc, S, R) in NeoX layout
    (each frequency twice), or (Bc, S, R/2) when compact (GPT-J)."""
    if cos.dim() != 3 or cos.shape != sin.shape or (not compact and cos.shape[-1] % 2):
        return
    bc, s, r = cos.shape
    half = r if compact else r // 2
    table_cos = cos[..., :half].reshape(bc * s, half).float().contiguous()   # (Bc*S, R/2)
    table_sin = sin[..., :half].reshape(bc * s, half).float().contiguous()
    positions = None
    if bc > 1:                              # a position per (b, s): row b*S + s of the table
        positions = torch.arange(bc * s, device=cos.device, dtype=torch.int64).view(bc, s)
    setattr(cos, _TABLES, (table_cos, table_sin, positions))


def _tagging_forward(cls):
    """cls.forward, then the compact tables attached to the returned cos."""
    if _is_interleaved(cls):
        def forward(self, *args, **kwargs):
            sin, cos = cls.forward(self, *args, **kwargs)        # GPT-J's order
            _attach_tables(cos, sin, compact=True)
            return sin, cos
    else:
        def forward(self, *args, **kwargs):
            cos, sin = cls.forward(self, *args, **kwargs)
            _attach_tables(cos, sin)
            return cos, sin
    return forward


def fast_rotary_class(cls):
    """The tagging subclass of an HF rotary-embedding class (one per class)."""
    return subclass_with_forward(
        cls, _tagging_forward,
        f"{cls.__name__} whose cos also carries fastattn's rotary tables.", __name__)


def _rotate(q, k, tables):
    table_cos, table_sin, positions = tables
    # q (B, H, S, D), k (B, Hkv, S, D): the sequence is dim 2
    b, s = q.shape[0], q.shape[2]
    if positions is not None and positions.shape[0] != b:
        return None
    return _functional.apply_rotary_qk(q, k, table_cos, table_sin, seq_dim=2,
                                       positions=positions)


def _wrap_apply(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        tables = getattr(cos, _TABLES, None)
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if (tables is not None and unsqueeze_dim == 1 and len(args) <= 1
                and set(kwargs) <= {"unsqueeze_dim"} and q.dim() == 4 and k.dim() == 4
                and q.shape[2] == k.shape[2] and q.shape[-1] == k.shape[-1]):
            out = _rotate(q, k, tables)
            if out is not None:
                return out
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._fastattn_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


def _wrap_apply_interleaved(original):
    """GPT-J's apply_rotary_pos_emb(tensor, sin, cos): tensor (B, S, H, R), adjacent pairs."""
    def apply_rotary_pos_emb(tensor, sin, cos, *args, **kwargs):
        tables = getattr(cos, _TABLES, None)
        if tables is not None and not args and not kwargs and tensor.dim() == 4:
            table_cos, table_sin, positions = tables
            b, s = tensor.shape[:2]
            if (2 * table_cos.shape[1] == tensor.shape[-1]
                    and (positions is None or positions.shape == (b, s))
                    and (positions is not None or table_cos.shape[0] == s)):
                return _functional.apply_rotary(tensor, table_cos, table_sin,
                                                interleaved=True, seq_dim=1,
                                                positions=positions)
        return original(tensor, sin, cos, *args, **kwargs)

    apply_rotary_pos_emb._fastattn_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


def install_apply_wrapper(modeling_module_name, interleaved=False):
    """Wrap `apply_rotary_pos_emb` of a transformers modeling module (once). Returns a reason
    string when the module has no such function."""
    mod = sys.modules.get(modeling_module_name)
    fn = getattr(mod, "apply_rotary_pos_emb", None) if mod is not None else None
    if fn is None:
        return f"{modeling_module_name} has no apply_rotary_pos_emb"
    if getattr(fn, "_fastattn_original", None) is None:
        wrap = _wrap_apply_interleaved if interleaved else _wrap_apply
        mod.apply_rotary_pos_emb = wrap(fn)
    return None


def convert_rotary(module, attention_modules):
    """Switch `module` (an HF rotary embedding) to its tagging subclass, in place, and wrap the
    apply function of the modeling files of `attention_modules`. (module, None) or
    (None, reason)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None, "it has hooks registered"
    reasons = set()
    for name in {type(a).__module__ for a in attention_modules}:
        reason = install_apply_wrapper(name, interleaved=_is_interleaved(type(module)))
        if reason:
            reasons.add(reason)
    if reasons:
        return None, "; ".join(sorted(reasons))
    module.__class__ = fast_rotary_class(type(module))
    return module, None

