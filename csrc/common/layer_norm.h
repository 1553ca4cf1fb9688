// LayerNorm / RMSNorm over the rows of an (M, N) matrix: parameters and per-element math
// shared by CPU and CUDA. `rms` selects RMSNorm (no mean, no bias).
#pragma once
#include "common/types.h"

namespace fastattn {

struct NormParams {
  DType dtype = DType::kFloat32;
  bool rms = false;
  const void* x = nullptr;         // (rows, cols), row stride x_stride, last dim contiguous
  const void* residual = nullptr;  // optional, row stride res_stride
  const float* weight = nullptr;   // optional (cols,) fp32
  const float* bias = nullptr;     // optional (cols,) fp32
  void* y = nullptr;               // contiguous
  void* h = nullptr;               // contiguous; written only when residual is given
  float* mean = nullptr;           // (rows,), layer norm only
  float* rstd = nullptr;           // (rows,)
  int64_t rows = 0, cols = 0, x_stride = 0, res_stride = 0;
  float eps = 1e-5f;
};

struct NormBackwardParams {
  DType dtype = DType::kFloat32;
  bool rms = false;
  const void* dy = nullptr;        // contiguous (rows, cols)
  const void* h = nullptr;         // contiguous (rows, cols)
  const void* dh_extra = nullptr;  // optional, contiguous
  const float* weight = nullptr;   // optional fp32
  const float* mean = nullptr;     // layer norm only
  const float* rstd = nullptr;
  void* dx = nullptr;              // contiguous
  // Per-chunk fp32 partial sums (partial_rows, cols), reduced by the caller afterwards;
  // null when the parameter is absent.
  float* dweight_partial = nullptr;
  float* dbias_partial = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t partial_rows = 0;
};

FA_HD float norm_rstd(float variance, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(variance + eps);
#else
  return 1.f / sqrtf(variance + eps);
#endif
}

// x_hat = (h - mean) * rstd (mean = 0 for RMSNorm). V is float or a SIMD vector of floats.
template <typename V>
FA_HD V norm_xhat(V h, V mean, V rstd) { return (h - mean) * rstd; }

template <typename V>
FA_HD V norm_affine(V xhat, V w, V b) { return xhat * w + b; }

// Gradient of the normalised input, with g = dy * w, mean_g = mean(g) (0 for RMSNorm) and
// mean_gx = mean(g * x_hat).
template <typename V>
FA_HD V norm_dx(V g, V xhat, V rstd, V mean_g, V mean_gx) {
  return rstd * (g - mean_g - xhat * mean_gx);
}

}  // namespace fastattn
