// CUDA LayerNorm / RMSNorm forward (optionally fused residual add) and backward.
// One block per row; statistics with CUB block reductions. The backward accumulates
// dweight/dbias into one fp32 partial row per block (no atomics), summed by the caller.
#include "cuda/launch.h"
#include "cuda/utils.cuh"

namespace fastattn::cuda::layer_norm {
namespace {

template <int N>
__device__ __forceinline__ void load_param(const float* w, int64_t j, float fill,
                                           float (&out)[N]) {
  if (w != nullptr) {
    load_f<N>(w + j, out);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = fill;
  }
}

// Each thread visits the same columns in every pass, so it re-reads only what it wrote itself.
#define FA_FOR_COLUMNS(j, cols, N) \
  for (int64_t j = int64_t(threadIdx.x) * (N); j < (cols); j += int64_t(kBlock) * (N))

template <typename T, int N>
__global__ void __launch_bounds__(kBlock, 1) forward_kernel(const NormParams p) {
  const float inv_cols = 1.f / static_cast<float>(p.cols);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* h = static_cast<const T*>(p.x) + row * p.x_stride;
    if (p.residual != nullptr) {
      const T* res = static_cast<const T*>(p.residual) + row * p.res_stride;
      T* hout = static_cast<T*>(p.h) + row * p.cols;
      FA_FOR_COLUMNS(j, p.cols, N) {
        float a[N], b[N];
        load_f<N>(h + j, a);
        load_f<N>(res + j, b);
#pragma unroll
        for (int i = 0; i < N; ++i) a[i] += b[i];
        store_f<N>(hout + j, a);  // rounded to T: the stream that gets normalised
      }
      h = hout;
    }
    float mean = 0.f;
    if (!p.rms) {
      float sum = 0.f;
      FA_FOR_COLUMNS(j, p.cols, N) {
        float a[N];
        load_f<N>(h + j, a);
#pragma unroll
        for (int i = 0; i < N; ++i) sum += a[i];
      }
      mean = block_sum(sum) * inv_cols;
    }
    float sq = 0.f;
    FA_FOR_COLUMNS(j, p.cols, N) {
      float a[N];
      load_f<N>(h + j, a);
#pragma unroll
      for (int i = 0; i < N; ++i) sq += (a[i] - mean) * (a[i] - mean);
    }
    const float rstd = norm_rstd(block_sum(sq) * inv_cols, p.eps);
    if (threadIdx.x == 0) {
      if (!p.rms) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    T* y = static_cast<T*>(p.y) + row * p.cols;
    FA_FOR_COLUMNS(j, p.cols, N) {
      float a[N], w[N], b[N];
      load_f<N>(h + j, a);
      load_param<N>(p.weight, j, 1.f, w);
      load_param<N>(p.bias, j, 0.f, b);
#pragma unroll
      for (int i = 0; i < N; ++i) a[i] = norm_affine(norm_xhat(a[i], mean, rstd), w[i], b[i]);
      store_f<N>(y + j, a);
    }
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kBlock, 1) backward_kernel(const NormBackwardParams p) {
  const float inv_cols = 1.f / static_cast<float>(p.cols);
  float* dw = p.dweight_partial ? p.dweight_partial + blockIdx.x * p.cols : nullptr;
  float* db = p.dbias_partial ? p.dbias_partial + blockIdx.x * p.cols : nullptr;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* dy = static_cast<const T*>(p.dy) + row * p.cols;
    const T* h = static_cast<const T*>(p.h) + row * p.cols;
    const float mean = p.rms ? 0.f : p.mean[row], rstd = p.rstd[row];
    float sg = 0.f, sgx = 0.f;
    FA_FOR_COLUMNS(j, p.cols, N) {
      float g[N], x[N], w[N];
      load_f<N>(dy + j, g);
      load_f<N>(h + j, x);
      load_param<N>(p.weight, j, 1.f, w);
      float pw[N], pb[N];
      if (dw) load_f<N>(dw + j, pw);
      if (db) load_f<N>(db + j, pb);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float xhat = norm_xhat(x[i], mean, rstd);
        pw[i] += g[i] * xhat;
        pb[i] += g[i];
        g[i] *= w[i];
        sg += g[i];
        sgx += g[i] * xhat;
      }
      if (dw) store_f<N>(dw + j, pw);
      if (db) store_f<N>(db + j, pb);
    }
    const float mean_g = p.rms ? 0.f : block_sum(sg) * inv_cols;
    const float mean_gx = block_sum(sgx) * inv_cols;
    T* dx = static_cast<T*>(p.dx) + row * p.cols;
    const T* extra = p.dh_extra ? static_cast<const T*>(p.dh_extra) + row * p.cols : nullptr;
    FA_FOR_COLUMNS(j, p.cols, N) {
      float g[N], x[N], w[N], e[N];
      load_f<N>(dy + j, g);
      load_f<N>(h + j, x);
      load_param<N>(p.weight, j, 1.f, w);
      if (extra) {
        load_f<N>(extra + j, e);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) e[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < N; ++i) {
        g[i] = norm_dx(g[i] * w[i], norm_xhat(x[i], mean, rstd), rstd, mean_g, mean_gx) + e[i];
      }
      store_f<N>(dx + j, g);
    }
  }
}

#undef FA_FOR_COLUMNS

}  // namespace

cudaError_t launch(const NormParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    // fp32 parameters are read kVec at a time too: 16 * sizeof(float) / sizeof(T) bytes.
    constexpr int64_t kParamAlign = kVec * sizeof(float);
    const bool vec = p.cols % kVec == 0 && p.x_stride % kVec == 0 && aligned(p.x, 16) &&
                     aligned(p.y, 16) &&
                     (!p.residual || (p.res_stride % kVec == 0 && aligned(p.residual, 16) &&
                                      aligned(p.h, 16))) &&
                     (!p.weight || aligned(p.weight, kParamAlign)) &&
                     (!p.bias || aligned(p.bias, kParamAlign));
    const dim3 grid(static_cast<unsigned>(grid_for(p.rows)));
    with_width<kVec>(vec, [&](auto width) {
      forward_kernel<T, decltype(width)::value><<<grid, kBlock, 0, stream>>>(p);
    });
  });
  return cudaGetLastError();
}

int64_t backward_blocks(int64_t rows) {
  int device = 0, sms = 108;
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  const int64_t blocks = 4 * static_cast<int64_t>(sms);
  return rows < blocks ? (rows > 0 ? rows : 1) : blocks;
}

cudaError_t launch(const NormBackwardParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    constexpr int64_t kParamAlign = kVec * sizeof(float);
    const bool vec = p.cols % kVec == 0 && aligned(p.dy, 16) && aligned(p.h, 16) &&
                     aligned(p.dx, 16) && (!p.dh_extra || aligned(p.dh_extra, 16)) &&
                     (!p.weight || aligned(p.weight, kParamAlign)) &&
                     (!p.dweight_partial || aligned(p.dweight_partial, kParamAlign)) &&
                     (!p.dbias_partial || aligned(p.dbias_partial, kParamAlign));
    // One block per partial row: the grid must match the buffer the caller allocated.
    const dim3 grid(static_cast<unsigned>(p.partial_rows));
    with_width<kVec>(vec, [&](auto width) {
      backward_kernel<T, decltype(width)::value><<<grid, kBlock, 0, stream>>>(p);
    });
  });
  return cudaGetLastError();
}

}  // namespace fastattn::cuda::layer_norm
