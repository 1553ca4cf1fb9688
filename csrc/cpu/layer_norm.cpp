// CPU LayerNorm / RMSNorm forward (optionally fused residual add) and backward.
#include "cpu/vec.h"  // first: selects the SIMD width

#include <ATen/Parallel.h>

#include "cpu/kernels.h"

// No contraction of a * b - c into one fma in the kernels below: the backward computes
// g = dy * w twice (once summed into mean(g), once per element) and needs both roundings to
// agree, or g - mean(g) keeps the rounding error of dy * w, which rstd (up to 1/sqrt(eps))
// amplifies: N = 1 gave dx = 5e-6 instead of 0. The explicit at::vec::fmadd calls stay fused.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace fastattn::cpu {
namespace {

// Columns [j, j + n) of an optional parameter row; `fill` everywhere when it is absent.
inline fVec ld_or(const float* p, int64_t j, int64_t n, float fill) {
  return p == nullptr ? fVec(fill) : load_f(p + j, n);
}

// Row statistics: fills mean (0 for RMSNorm) and rstd. Two passes (mean, then centred squares)
// for accuracy; both run on a row already in L1/L2. Four accumulators per pass: with fewer,
// each vector waits on the previous add's latency.
template <typename T>
void row_stats(const T* h, int64_t cols, float eps, bool rms, float& mean, float& rstd) {
  mean = 0.f;
  int64_t j = 0;
  if (!rms) {
    fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    for (; j + 4 * kF <= cols; j += 4 * kF) {
      a0 = a0 + load_f(h + j);
      a1 = a1 + load_f(h + j + kF);
      a2 = a2 + load_f(h + j + 2 * kF);
      a3 = a3 + load_f(h + j + 3 * kF);
    }
    for (; j < cols; j += kF) a0 = a0 + load_f(h + j, std::min<int64_t>(kF, cols - j));
    mean = hsum((a0 + a1) + (a2 + a3)) / static_cast<float>(cols);
  }
  const fVec vmean(mean);
  fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  for (j = 0; j + 4 * kF <= cols; j += 4 * kF) {
    const fVec d0 = load_f(h + j) - vmean, d1 = load_f(h + j + kF) - vmean;
    const fVec d2 = load_f(h + j + 2 * kF) - vmean, d3 = load_f(h + j + 3 * kF) - vmean;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
  }
  for (; j < cols; j += kF) {
    const int64_t n = std::min<int64_t>(kF, cols - j);
    const fVec d = head(load_f(h + j, n) - vmean, n, 0.f);
    a0 = at::vec::fmadd(d, d, a0);
  }
  rstd = norm_rstd(hsum((a0 + a1) + (a2 + a3)) / static_cast<float>(cols), eps);
}

template <typename T>
void forward(const NormParams& p) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.cols, 1));
  const bool stream = stream_output(p.rows * p.cols * int64_t(sizeof(T)));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* h = static_cast<const T*>(p.x) + r * p.x_stride;
      const T* next = r + 1 < end ? h + p.x_stride : nullptr;
      if (p.residual != nullptr) {
        // h = x + residual, rounded to T: the returned residual stream is what gets normalised.
        const T* res = static_cast<const T*>(p.residual) + r * p.res_stride;
        T* hout = static_cast<T*>(p.h) + r * p.cols;
        for (int64_t j = 0; j < p.cols; j += kF) {
          const int64_t n = std::min<int64_t>(kF, p.cols - j);
          store_f(hout + j, load_f(h + j, n) + load_f(res + j, n), n);
        }
        h = hout;
      }
      float mean, rstd;
      row_stats(h, p.cols, p.eps, p.rms, mean, rstd);
      if (!p.rms) p.mean[r] = mean;
      p.rstd[r] = rstd;
      const fVec vmean(mean), vrstd(rstd);
      T* y = static_cast<T*>(p.y) + r * p.cols;
      T* next_y = next != nullptr && !stream ? y + p.cols : nullptr;
      for (int64_t j = 0; j < p.cols; j += kF) {
        const int64_t n = std::min<int64_t>(kF, p.cols - j);
        prefetch_line(next, j);
        prefetch_line_for_write(next_y, j);
        const fVec xhat = norm_xhat(load_f(h + j, n), vmean, vrstd);
        const fVec out = norm_affine(xhat, ld_or(p.weight, j, n, 1.f), ld_or(p.bias, j, n, 0.f));
        stream ? store_stream(y + j, out, n) : store_f(y + j, out, n);
      }
    }
    stream_fence();
  });
}

template <typename T>
void backward(const NormBackwardParams& p) {
  const int64_t chunks = p.partial_rows;
  const int64_t per_chunk = (p.rows + chunks - 1) / chunks;
  const float inv_cols = 1.f / static_cast<float>(p.cols);
  const bool stream = stream_output(p.rows * p.cols * int64_t(sizeof(T)));
  // One fixed row range per chunk so the dweight/dbias sums do not depend on scheduling.
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    for (int64_t c = cbegin; c < cend; ++c) {
      float* dw = p.dweight_partial ? p.dweight_partial + c * p.cols : nullptr;
      float* db = p.dbias_partial ? p.dbias_partial + c * p.cols : nullptr;
      const int64_t rend = std::min(p.rows, (c + 1) * per_chunk);
      for (int64_t r = c * per_chunk; r < rend; ++r) {
        const T* dy = static_cast<const T*>(p.dy) + r * p.cols;
        const T* h = static_cast<const T*>(p.h) + r * p.cols;
        const fVec vmean(p.rms ? 0.f : p.mean[r]), vrstd(p.rstd[r]);
        // Pass 1: mean(g), mean(g * x_hat) with g = dy * w; parameter gradient partials.
        fVec sg(0.f), sgx(0.f);
        for (int64_t j = 0; j < p.cols; j += kF) {
          const int64_t n = std::min<int64_t>(kF, p.cols - j);
          const fVec vdy = load_f(dy + j, n);
          const fVec xhat = head(norm_xhat(load_f(h + j, n), vmean, vrstd), n, 0.f);
          const fVec g = vdy * ld_or(p.weight, j, n, 1.f);
          sg = sg + g;
          sgx = at::vec::fmadd(g, xhat, sgx);
          if (dw) at::vec::fmadd(vdy, xhat, load_f(dw + j, n)).store(dw + j, n);
          if (db) (vdy + load_f(db + j, n)).store(db + j, n);
        }
        const fVec mean_g(p.rms ? 0.f : hsum(sg) * inv_cols), mean_gx(hsum(sgx) * inv_cols);
        // Pass 2: dx (+ the gradient that reached the returned h directly).
        T* dx = static_cast<T*>(p.dx) + r * p.cols;
        const T* extra = p.dh_extra ? static_cast<const T*>(p.dh_extra) + r * p.cols : nullptr;
        const bool more = r + 1 < rend;
        const T* next_dy = more ? dy + p.cols : nullptr;
        const T* next_h = more ? h + p.cols : nullptr;
        T* next_dx = more && !stream ? dx + p.cols : nullptr;
        for (int64_t j = 0; j < p.cols; j += kF) {
          const int64_t n = std::min<int64_t>(kF, p.cols - j);
          prefetch_line(next_dy, j);
          prefetch_line(next_h, j);
          prefetch_line_for_write(next_dx, j);
          const fVec xhat = norm_xhat(load_f(h + j, n), vmean, vrstd);
          const fVec g = load_f(dy + j, n) * ld_or(p.weight, j, n, 1.f);
          fVec d = norm_dx(g, xhat, vrstd, mean_g, mean_gx);
          if (extra) d = d + load_f(extra + j, n);
          stream ? store_stream(dx + j, d, n) : store_f(dx + j, d, n);
        }
      }
    }
    stream_fence();
  });
}

}  // namespace

void norm_forward(const NormParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { forward<decltype(t)>(p); });
}

int64_t norm_backward_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
}

void norm_backward(const NormBackwardParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { backward<decltype(t)>(p); });
}

}  // namespace fastattn::cpu
