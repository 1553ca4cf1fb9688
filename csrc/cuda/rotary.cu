// CUDA rotary embedding: one thread per rotated pair (plus one per copied tail feature when
// writing out of place). Any strides; int64 offsets.
#include "cuda/launch.h"
#include "cuda/utils.cuh"

namespace fastattn::cuda::rotary {
namespace {

template <typename T>
__global__ void __launch_bounds__(kBlock) rotary_kernel(const RotaryParams p, int64_t work,
                                                        int64_t total) {
  const int64_t half = p.rot_dim / 2;
  for (int64_t idx = blockIdx.x * int64_t(kBlock) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kBlock) {
    const int64_t row = idx / work, k = idx % work;
    const int64_t hd = row % p.heads, s = (row / p.heads) % p.seqlen;
    const int64_t b = row / (p.heads * p.seqlen);
    const T* x = static_cast<const T*>(p.x) + b * p.x_strides[0] + s * p.x_strides[1] +
                 hd * p.x_strides[2];
    T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + s * p.out_strides[1] +
             hd * p.out_strides[2];
    const int64_t xs = p.x_strides[3], os = p.out_strides[3];
    if (k >= half) {  // a feature past the rotary dim: copied
      const int64_t d = p.rot_dim + (k - half);
      out[d * os] = x[d * xs];
      continue;
    }
    const int64_t pos = rotary_position(p, b, s);
    const int64_t i = rotary_first(k, p.rot_dim, p.interleaved);
    const int64_t i2 = rotary_second(k, p.rot_dim, p.interleaved);
    float oa = NAN, ob = NAN;  // a position outside the cache yields NaN, never a wild read
    if (pos >= 0 && pos < p.s_cache) {
      const float c = p.cos[pos * half + k];
      const float sn = p.conjugate ? -p.sin[pos * half + k] : p.sin[pos * half + k];
      rotary_rotate(to_f(x[i * xs]), to_f(x[i2 * xs]), c, sn, oa, ob);
    }
    out[i * os] = from_f<T>(oa);
    out[i2 * os] = from_f<T>(ob);
  }
}

}  // namespace

cudaError_t launch(const RotaryParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.seqlen * p.heads;
  const int64_t copies = p.out == p.x ? 0 : p.head_dim - p.rot_dim;
  const int64_t work = p.rot_dim / 2 + copies;
  const int64_t total = rows * work;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  const dim3 grid(static_cast<unsigned>(blocks < (int64_t(1) << 30) ? blocks : (int64_t(1) << 30)));
  dispatch_dtype(p.dtype, [&](auto t) {
    rotary_kernel<decltype(t)><<<grid, kBlock, 0, stream>>>(p, work, total);
  });
  return cudaGetLastError();
}

}  // namespace fastattn::cuda::rotary
