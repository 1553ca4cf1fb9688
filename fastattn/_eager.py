"""The eager fast path (csrc/eager.cpp): fastattn.softmax, layer_norm, rms_norm,
scaled_dot_product_attention, apply_rotary, apply_rotary_qk, kvcache_attention, swiglu and linear on plain CPU
tensors that need no gradient, on the `cpu` backend,
outside torch.compile, call the registered kernel op straight from C++.

Each function returns the result, or None when the call is not the plain case it accepts; the
public function then takes its general path (validation, the selector, the custom op). Why it
exists: at one-token decode and other tiny sizes the Python layers cost several times the
kernel (benchmarks/cases/overhead.py, `python -m benchmarks --ops overhead`). Without the
extension every function returns None.
"""

from . import _backend

try:
    from . import _C
    _C._eager_init(_backend._override, _backend._dispatch_logs)
    softmax = _C._eager_softmax          # (x, dim, scale, causal)
    rms_norm = _C._eager_rms_norm        # (input, normalized_shape, weight, eps)
    layer_norm = _C._eager_layer_norm    # (input, normalized_shape, weight, bias, eps)
    attention = _C._eager_attention      # (q, k, v, dropout_p, is_causal, scale, enable_gqa)
    rotary = _C._eager_rotary            # (x, cos, sin, interleaved, seq_dim, positions)
    rotary_qk = _C._eager_rotary_qk      # (q, k, cos, sin, interleaved, seq_dim, positions)
    # (q, k_cache, v_cache, cache_seqlens, scale, is_causal, softcap)
    kvcache_attention = _C._eager_kvcache_attention
    swiglu = _C._eager_swiglu            # (gate, up)
    linear = _C._eager_linear            # (input, weight, bias)
except (ImportError, AttributeError):   # not built, or built before the fast path existed
    def softmax(x, dim, scale, causal):
        return None

    def rms_norm(input, normalized_shape, weight, eps):
        return None

    def layer_norm(input, normalized_shape, weight, bias, eps):
        return None

    def attention(q, k, v, dropout_p, is_causal, scale, enable_gqa):
        return None

    def rotary(x, cos, sin, interleaved, seq_dim, positions):
        return None

    def rotary_qk(q, k, cos, sin, interleaved, seq_dim, positions):
        return None

    def kvcache_attention(q, k_cache, v_cache, cache_seqlens, scale, is_causal, softcap):
        return None

    def swiglu(gate, up):
        return None

    def linear(input, weight, bias):
        return None
