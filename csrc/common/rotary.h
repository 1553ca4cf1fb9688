// Rotary position embedding of x (B, S, H, D): parameters and per-pair math shared by CPU and
// CUDA.
#pragma once
#include "common/types.h"

namespace fastattn {

struct RotaryParams {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  void* out = nullptr;              // may equal x (in place)
  const float* cos = nullptr;       // (s_cache, rot_dim / 2) contiguous fp32
  const float* sin = nullptr;
  const int64_t* offsets = nullptr;  // optional (B,)
  const int64_t* positions = nullptr;  // optional (B, S) contiguous: absolute position per row
                                       // (left-padded batches, packed sequences); wins over offsets
  int64_t batch = 0, seqlen = 0, heads = 0, head_dim = 0, rot_dim = 0, s_cache = 0;
  int64_t x_strides[4] = {};        // (B, S, H, D) in elements
  int64_t out_strides[4] = {};
  bool interleaved = false;         // GPT-J pairs (2d, 2d+1); else NeoX pairs (d, d+R/2)
  bool conjugate = false;           // rotate by -angle (the backward)
};

// Cache row of token (b, s): positions[b, s] when given, else s + offsets[b] (or s).
FA_HD int64_t rotary_position(const RotaryParams& p, int64_t b, int64_t s) {
  if (p.positions) return p.positions[b * p.seqlen + s];
  return s + (p.offsets ? p.offsets[b] : 0);
}

// Element index of the pair partner of feature d (d < R/2 picks the pair's first element).
FA_HD int64_t rotary_first(int64_t pair, int64_t rot_dim, bool interleaved) {
  return interleaved ? 2 * pair : pair;
}
FA_HD int64_t rotary_second(int64_t pair, int64_t rot_dim, bool interleaved) {
  return interleaved ? 2 * pair + 1 : pair + rot_dim / 2;
}

// (a, b) -> (a cos - b sin, a sin + b cos). V is float or a SIMD vector of floats.
template <typename V>
FA_HD void rotary_rotate(V a, V b, V c, V s, V& out_a, V& out_b) {
  out_a = a * c - b * s;
  out_b = a * s + b * c;
}

}  // namespace fastattn
