// Device helpers shared by the CUDA kernels: dtype dispatch, fp32 conversion, 128-bit packed
// loads/stores, CUB block reductions. Torch-free.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>
#include <cub/block/block_reduce.cuh>

#include "common/types.h"

namespace fastattn::cuda {

constexpr int kBlock = 256;  // threads per block of the row-wise kernels

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f(float v) { return v; }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f(float v) { return v; }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) {
  return __float2bfloat16_rn(v);
}

// N elements moved as one access (128 bits when N = 16 / sizeof(T)); the address must be
// aligned to sizeof(Pack) — the launchers check that before choosing N > 1.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_f(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f(pk.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store_f(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Sum over the block, returned to every thread. Ends with a barrier so it can be called again.
__device__ __forceinline__ float block_sum(float v) {
  using Reduce = cub::BlockReduce<float, kBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float total;
  const float r = Reduce(tmp).Sum(v);
  if (threadIdx.x == 0) total = r;
  __syncthreads();
  const float out = total;
  __syncthreads();
  return out;
}

// Calls f(T{}) with T the device element type of d.
template <typename F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

// Calls launch(std::integral_constant<int, N>{}) with N = kVec when `vec` (every access of the
// call is aligned for it), else N = 1: the one place the row-wise launchers pick their width.
template <int kVec, typename Launch>
void with_width(bool vec, Launch&& launch) {
  if (vec) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Whether every row start of r (plus base) is a multiple of vec elements.
inline bool rows_aligned(const RowIndexer& r, int64_t vec) {
  for (int d = 0; d < r.ndim; ++d) {
    if (r.strides[d] % vec != 0) return false;
  }
  return true;
}

inline int64_t grid_for(int64_t rows) { return rows < (1 << 20) ? rows : (1 << 20); }

}  // namespace fastattn::cuda
