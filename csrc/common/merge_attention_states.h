// Merging two partial attention results over disjoint key sets: parameters and the per-row
// weights, shared by CPU and CUDA.
#pragma once
#include "common/types.h"

namespace fastattn {

struct MergeAttentionStatesParams {
  DType dtype = DType::kFloat32;
  const void* out_a = nullptr;  // (rows, cols) via out_a_rows, last dim contiguous
  const void* out_b = nullptr;  // (rows, cols) via out_b_rows, last dim contiguous
  const float* lse_a = nullptr;  // (rows,) contiguous
  const float* lse_b = nullptr;  // (rows,) contiguous
  void* out = nullptr;           // contiguous (rows, cols)
  float* lse = nullptr;          // contiguous (rows,)
  RowIndexer out_a_rows, out_b_rows;
  int64_t rows = 0, cols = 0;
};

// lse = log(exp(lse_a) + exp(lse_b)), out = w_a * out_a + w_b * out_b with w = exp(lse_x - lse).
// Computed around the larger of the two so no exp overflows; a row where both are -inf (no
// keys on either side) gets lse = -inf and weights 0 (out = 0), never NaN.
struct MergeWeights {
  float lse, w_a, w_b;
};

FA_HD MergeWeights merge_weights(float lse_a, float lse_b) {
  const float m = lse_a > lse_b ? lse_a : lse_b;
  if (m == -INFINITY) return {-INFINITY, 0.f, 0.f};
  const float ea = expf(lse_a - m), eb = expf(lse_b - m);  // one of them is exactly 1
  const float sum = ea + eb;
  return {m + logf(sum), ea / sum, eb / sum};
}

}  // namespace fastattn
