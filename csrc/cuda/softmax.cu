// CUDA softmax over the last dim (scale, bool/float mask, causal) and its backward.
// One block per row: an online (max, sum) pass with a CUB block reduction, then a write pass.
#include "cuda/launch.h"
#include "cuda/utils.cuh"

namespace fastattn::cuda::softmax {
namespace {

// Scores of columns [j, j + N) of a row; masked or causally hidden columns are -inf.
template <int N, typename T>
__device__ __forceinline__ void scores(const SoftmaxParams& p, const T* x, const void* mask,
                                       int64_t j, int64_t visible, float (&v)[N]) {
  load_f<N>(x + j, v);
  float add[N];
  if (p.mask_kind == MaskKind::kFloat) {
    load_f<N>(static_cast<const T*>(mask) + j, add);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) add[i] = 0.f;
  }
  if (p.mask_kind == MaskKind::kBool) {
    const Pack<uint8_t, N> keep = *reinterpret_cast<const Pack<uint8_t, N>*>(
        static_cast<const uint8_t*>(mask) + j);
#pragma unroll
    for (int i = 0; i < N; ++i) add[i] = keep.v[i] ? 0.f : -INFINITY;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = j + i < visible ? softmax_score(v[i], p.scale, add[i]) : -INFINITY;
  }
}

struct MergeStats {
  __device__ __forceinline__ SoftmaxStats operator()(const SoftmaxStats& a,
                                                     const SoftmaxStats& b) const {
    return softmax_stats_merge(a, b);
  }
};

template <typename T, int N>
__global__ void __launch_bounds__(kBlock) forward_kernel(const SoftmaxParams p) {
  using Reduce = cub::BlockReduce<SoftmaxStats, kBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ SoftmaxStats row_stats;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row_offset(p.x_rows, row);
    const void* mask = nullptr;
    if (p.mask_kind == MaskKind::kFloat) {
      mask = static_cast<const T*>(p.mask) + row_offset(p.mask_rows, row);
    } else if (p.mask_kind == MaskKind::kBool) {
      mask = static_cast<const uint8_t*>(p.mask) + row_offset(p.mask_rows, row);
    }
    T* y = static_cast<T*>(p.y) + row * p.cols;
    const int64_t visible = softmax_visible_cols(row, p.m, p.cols, p.causal);
    SoftmaxStats st{-INFINITY, 0.f};
    for (int64_t j = int64_t(threadIdx.x) * N; j < p.cols; j += int64_t(kBlock) * N) {
      float v[N];
      scores<N>(p, x, mask, j, visible, v);
#pragma unroll
      for (int i = 0; i < N; ++i) st = softmax_stats_add(st, v[i]);
    }
    const SoftmaxStats total = Reduce(tmp).Reduce(st, MergeStats());
    if (threadIdx.x == 0) row_stats = total;
    __syncthreads();
    const float mx = softmax_safe_max(row_stats.max), inv = softmax_safe_inv(row_stats.sum);
    __syncthreads();  // row_stats and tmp are reused by the next row
    for (int64_t j = int64_t(threadIdx.x) * N; j < p.cols; j += int64_t(kBlock) * N) {
      float v[N];
      scores<N>(p, x, mask, j, visible, v);
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = __expf(v[i] - mx) * inv;
      store_f<N>(y + j, v);
    }
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kBlock) backward_kernel(const SoftmaxBackwardParams p) {
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* dy = static_cast<const T*>(p.dy) + row_offset(p.dy_rows, row);
    const T* y = static_cast<const T*>(p.y) + row_offset(p.y_rows, row);
    T* dx = static_cast<T*>(p.dx) + row * p.cols;
    float dot = 0.f;
    for (int64_t j = int64_t(threadIdx.x) * N; j < p.cols; j += int64_t(kBlock) * N) {
      float a[N], b[N];
      load_f<N>(dy + j, a);
      load_f<N>(y + j, b);
#pragma unroll
      for (int i = 0; i < N; ++i) dot += a[i] * b[i];
    }
    dot = block_sum(dot);
    for (int64_t j = int64_t(threadIdx.x) * N; j < p.cols; j += int64_t(kBlock) * N) {
      float a[N], b[N];
      load_f<N>(dy + j, a);
      load_f<N>(y + j, b);
#pragma unroll
      for (int i = 0; i < N; ++i) a[i] = softmax_grad(b[i], a[i], dot, p.scale);
      store_f<N>(dx + j, a);
    }
  }
}

}  // namespace

cudaError_t launch(const SoftmaxParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    const bool mask_ok = p.mask_kind == MaskKind::kNone ||
                         (rows_aligned(p.mask_rows, kVec) &&
                          aligned(p.mask, p.mask_kind == MaskKind::kBool ? kVec : 16));
    const bool vec = p.cols % kVec == 0 && aligned(p.x, 16) && aligned(p.y, 16) &&
                     rows_aligned(p.x_rows, kVec) && mask_ok;
    const dim3 grid(static_cast<unsigned>(grid_for(p.rows)));
    with_width<kVec>(vec, [&](auto width) {
      forward_kernel<T, decltype(width)::value><<<grid, kBlock, 0, stream>>>(p);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch(const SoftmaxBackwardParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = p.cols % kVec == 0 && aligned(p.dy, 16) && aligned(p.y, 16) &&
                     aligned(p.dx, 16) && rows_aligned(p.dy_rows, kVec) &&
                     rows_aligned(p.y_rows, kVec);
    const dim3 grid(static_cast<unsigned>(grid_for(p.rows)));
    with_width<kVec>(vec, [&](auto width) {
      backward_kernel<T, decltype(width)::value><<<grid, kBlock, 0, stream>>>(p);
    });
  });
  return cudaGetLastError();
}

}  // namespace fastattn::cuda::softmax
