"""fastattn as a Hugging Face transformers attention implementation.

    import fastattn
    from fastattn.integrations.transformers import register
    register()                                    # explicit: nothing happens at import time
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn")
    model.set_attn_implementation("fastattn")     # or on an existing model

`fastattn.patch(model)` on a transformers model registers, switches the model to "fastattn"
and also swaps the family's RMSNorm / rotary code for fastattn's kernels (see hf_patch.py).
transformers is imported only when one of these functions is called.
"""

from .hf_attention import fastattn_attention_forward, record_routes

ATTN_IMPLEMENTATION = "fastattn"

__all__ = ["register", "is_registered", "is_transformers_model", "fastattn_attention_forward",
           "record_routes", "ATTN_IMPLEMENTATION"]


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise ImportError("fastattn.integrations.transformers needs Hugging Face transformers "
                          ">= 5 (pip install 'fastattn[transformers]')") from exc
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register(name=ATTN_IMPLEMENTATION):
    """Add `name` ("fastattn") to transformers' AttentionInterface and AttentionMaskInterface.

    The mask entry is transformers' boolean SDPA mask builder: None when a plain causal mask
    suffices (the kernels then run causal without a mask), else a (B, 1, Sq, Sk) bool mask.
    Idempotent. Returns `name`.
    """
    attention_interface, mask_interface, sdpa_mask = _interfaces()
    attention_interface.register(name, fastattn_attention_forward)
    mask_interface.register(name, sdpa_mask)
    return name


def is_registered(name=ATTN_IMPLEMENTATION):
    try:
        attention_interface, mask_interface, _ = _interfaces()
    except ImportError:
        return False
    return (attention_interface._global_mapping.get(name) is fastattn_attention_forward
            and name in mask_interface._global_mapping)


def is_transformers_model(model):
    """True for a transformers PreTrainedModel (checked without importing transformers)."""
    import sys
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)
