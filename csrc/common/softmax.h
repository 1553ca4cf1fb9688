// Softmax over the last dim: parameters and per-element math shared by CPU and CUDA.
#pragma once
#include "common/types.h"

namespace fastattn {

struct SoftmaxParams {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;   // rows via x_rows, last dim contiguous
  void* y = nullptr;         // contiguous (rows, cols)
  const void* mask = nullptr;  // rows via mask_rows, last dim contiguous; bool stored as uint8
  MaskKind mask_kind = MaskKind::kNone;  // a kFloat mask has x's dtype
  RowIndexer x_rows, mask_rows;
  int64_t rows = 0, cols = 0;
  int64_t m = 1;             // size of dim -2 (the causal row index is row % m)
  float scale = 1.f;
  bool causal = false;
};

struct SoftmaxBackwardParams {
  DType dtype = DType::kFloat32;
  const void* dy = nullptr;  // rows via dy_rows, last dim contiguous
  const void* y = nullptr;   // rows via y_rows, last dim contiguous
  void* dx = nullptr;        // contiguous (rows, cols)
  RowIndexer dy_rows, y_rows;
  int64_t rows = 0, cols = 0;
  float scale = 1.f;
};

// Number of leading columns of a row that causal masking keeps (all when not causal).
FA_HD int64_t softmax_visible_cols(int64_t row, int64_t m, int64_t cols, bool causal) {
  if (!causal) return cols;
  const int64_t i = row % m;
  return i + 1 < cols ? i + 1 : cols;
}

// A fully masked row has max -inf; subtracting 0 instead makes every exp() exactly 0.
FA_HD float softmax_safe_max(float row_max) { return row_max == -INFINITY ? 0.f : row_max; }

// 1/sum, with an empty row (sum 0) giving 0 so the output is 0, never NaN.
FA_HD float softmax_safe_inv(float sum) { return sum > 0.f ? 1.f / sum : 0.f; }

// The score before the max subtraction. V is float or a SIMD vector of floats.
template <typename V>
FA_HD V softmax_score(V x, V scale, V mask_add) { return x * scale + mask_add; }

// dx = scale * y * (dy - sum(dy * y)).
template <typename V>
FA_HD V softmax_grad(V y, V dy, V dot, V scale) { return scale * y * (dy - dot); }

}  // namespace fastattn

namespace fastattn {

// Running (max, sum of exp(v - max)) of the online softmax, and the merge of two of them.
struct SoftmaxStats {
  float max;
  float sum;
};

FA_HD SoftmaxStats softmax_stats_add(SoftmaxStats a, float v) {
  if (v > a.max) return {v, a.sum * expf(a.max - v) + 1.f};
  if (v != -INFINITY) a.sum += expf(v - a.max);
  return a;
}

FA_HD SoftmaxStats softmax_stats_merge(SoftmaxStats a, SoftmaxStats b) {
  const float m = a.max > b.max ? a.max : b.max;
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

}  // namespace fastattn
