"""A KV cache for transformers' `generate` that appends in place instead of concatenating.

transformers' default cache layer (DynamicLayer) grows each layer's keys and values with
`torch.cat` on every step, so step t copies all t cached tokens again: O(T^2) bytes over a
generation, about a fifth of a small model's CPU `generate` time. `GrowingLayer` keeps them in
a buffer with spare room along the sequence (doubled when full, so each token is copied O(1)
times on average) and returns (B, Hkv, S, D) views of the filled prefix. fastattn's decode
route reads those views in place (`kvcache_attention` takes strided caches), and any other
attention implementation sees ordinary strided tensors.

`GrowingCache` is transformers' DynamicCache with its full-attention layers swapped for
GrowingLayer (sliding-window layers keep transformers' own, bounded, layer).
`fastattn.patch(model)` gives the DynamicCache that the model's `generate` builds for itself
GrowingLayers (`install_generate_cache`); a cache the caller passes is left alone.

What a caller may rely on:
  - The returned keys/values are views: a later `update` writes past their end, never inside
    them, except after `crop` (assisted decoding), which shortens the cache so the next
    update overwrites the cropped tokens, as a fresh cat would replace them.
  - When autograd must record the update (grad mode and key/value states that require grad)
    the layer concatenates like DynamicLayer: writing into a buffer that a backward still
    needs would be an error.
  - Anything that replaces the tensors (beam search's reorder, batch selection, offloading)
    is followed by a copy into a new buffer on the next update.
"""

import functools


def _cache_classes():
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError as exc:
        raise ImportError("fastattn's KV cache for generate needs Hugging Face transformers "
                          ">= 5 (pip install 'fastattn[transformers]')") from exc
    return DynamicCache, DynamicLayer


@functools.lru_cache(maxsize=None)
def growing_layer_class():
    _, dynamic_layer = _cache_classes()

    class GrowingLayer(dynamic_layer):
        """DynamicLayer whose update appends into a buffer with spare capacity."""

        _key_buffer = None    # (B, Hkv, capacity, D)
        _value_buffer = None
        _views = None         # the (keys, values) views the last update returned

        def _still_ours(self, key_states, value_states):
            """Are self.keys/values prefixes of this layer's buffers, with room to match
            key_states/value_states? When they are the very views the last update made
            (nothing replaced them since), without looking at their storage."""
            views = self._views
            mine = (views is not None and views[0] is self.keys and views[1] is self.values)
            return (mine or self._holds_buffers()) and self._buffers_fit(key_states,
                                                                         value_states)

        def _holds_buffers(self):
            """Are self.keys/values (B, Hkv, S, D) prefixes of this layer's buffers?"""
            kb, vb, k, v = self._key_buffer, self._value_buffer, self.keys, self.values
            if kb is None or k is None or v is None or k.dim() != 4 or v.dim() != 4:
                return False
            return (k.data_ptr() == kb.data_ptr() and v.data_ptr() == vb.data_ptr()
                    and k.stride() == kb.stride() and v.stride() == vb.stride()
                    and k.shape[:2] == kb.shape[:2] and v.shape[:2] == vb.shape[:2])

        def _buffers_fit(self, key_states, value_states):
            """Do the buffers take key_states/value_states (batch, heads, head dim, dtype,
            device)?"""
            kb, vb = self._key_buffer, self._value_buffer
            return (kb.shape[:2] == key_states.shape[:2]
                    and vb.shape[:2] == value_states.shape[:2]
                    and kb.shape[-1] == key_states.shape[-1]
                    and vb.shape[-1] == value_states.shape[-1]
                    and kb.dtype == key_states.dtype and vb.dtype == value_states.dtype
                    and kb.device == key_states.device)

        def _regrow(self, key_states, value_states, old, needed):
            """New buffers of capacity >= needed holding the `old` cached tokens."""
            capacity = max(needed, 2 * old, 16)
            b, hk, _, dk = key_states.shape
            hv, dv = value_states.shape[1], value_states.shape[-1]
            kb = key_states.new_empty((b, hk, capacity, dk))
            vb = value_states.new_empty((b, hv, capacity, dv))
            if old:
                kb[:, :, :old].copy_(self.keys)
                vb[:, :, :old].copy_(self.values)
            self._key_buffer, self._value_buffer = kb, vb

        def update(self, key_states, value_states, *args, **kwargs):
            import torch
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if (key_states.dim() != 4 or value_states.dim() != 4
                    or (torch.is_grad_enabled()
                        and (key_states.requires_grad or value_states.requires_grad))):
                self._key_buffer = self._value_buffer = self._views = None
                return super().update(key_states, value_states, *args, **kwargs)
            old = self.get_seq_length()            # 0 for the empty initial tensors
            new = old + key_states.shape[-2]
            if (not self._still_ours(key_states, value_states)
                    or new > self._key_buffer.shape[2]):
                self._regrow(key_states, value_states, old, new)
            self._key_buffer[:, :, old:new].copy_(key_states)
            self._value_buffer[:, :, old:new].copy_(value_states)
            self.keys = self._key_buffer[:, :, :new]
            self.values = self._value_buffer[:, :, :new]
            self._views = (self.keys, self.values)
            return self.keys, self.values

        def reset(self):
            self._key_buffer = self._value_buffer = self._views = None
            super().reset()

    GrowingLayer.__module__ = __name__
    GrowingLayer.__qualname__ = "GrowingLayer"
    return GrowingLayer


@functools.lru_cache(maxsize=None)
def growing_cache_class():
    dynamic_cache, _ = _cache_classes()

    class GrowingCache(dynamic_cache):
        """transformers' DynamicCache whose full-attention layers append in place
        (GrowingLayer); same constructor arguments. Pass it to generate/forward as the
        cache to use it explicitly."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            make_growing(self)                    # keeps what ddp_cache_data filled in

    GrowingCache.__module__ = __name__
    GrowingCache.__qualname__ = "GrowingCache"
    return GrowingCache


def make_growing(cache):
    """Turn the full-attention layers of a transformers DynamicCache into GrowingLayers, in
    place (any tokens already cached are kept). Returns the cache."""
    _, dynamic_layer = _cache_classes()
    layer_cls = growing_layer_class()
    for layer in cache.layers:
        if type(layer) is dynamic_layer:
            layer.__class__ = layer_cls
    if getattr(cache, "layer_class_to_replicate", None) is dynamic_layer:
        cache.layer_class_to_replicate = layer_cls
    return cache


def install_generate_cache(model):
    """Make `model.generate` append in place: the DynamicCache that generate builds for itself
    (the caller passed no cache, no `cache_implementation` other than "dynamic", no
    offloading) gets GrowingLayers. A cache the caller passes is left as it is. Returns None
    when installed (or already), else the reason it was not."""
    original = getattr(model, "_prepare_cache_for_generation", None)
    if original is None:
        return "this transformers version has no _prepare_cache_for_generation hook"
    if getattr(original, "_fastattn_growing", False):
        return None
    dynamic_cache, _ = _cache_classes()

    @functools.wraps(original)
    def prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs):
        result = original(generation_config, model_kwargs, *args, **kwargs)
        for name in ("cache", "past_key_values"):
            cache = model_kwargs.get(name)
            if (type(cache) is dynamic_cache and not getattr(cache, "_is_user_defined", False)
                    and not getattr(cache, "offloading", False)):
                make_growing(cache)
        return result

    prepare_cache_for_generation._fastattn_growing = True
    model._prepare_cache_for_generation = prepare_cache_for_generation
    return None
