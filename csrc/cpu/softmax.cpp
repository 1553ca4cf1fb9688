// CPU softmax over the last dim (scale, bool/float mask, causal) and its backward.
#include "cpu/vec.h"  // first: selects the SIMD width

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/fast_exp.h"
#include "cpu/kernels.h"

namespace fastattn::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Scores of columns [j, j + n) of one row (n <= kF); masked lanes are -inf.
template <typename T>
inline fVec score_vec(const T* x, const void* mask, MaskKind kind, int64_t j, int64_t n,
                      const fVec& vscale) {
  const fVec s = load_f(x + j, n);
  fVec add(0.f);
  if (kind == MaskKind::kFloat) {
    const T* m = static_cast<const T*>(mask) + j;
    add = load_f(m, n);
  } else if (kind == MaskKind::kBool) {
    const uint8_t* m = static_cast<const uint8_t*>(mask) + j;
    __at_align__ float tmp[kF] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = m[i] ? 0.f : kNegInf;
    add = fVec::loadu(tmp);
  }
  return softmax_score(s, vscale, add);
}

// The last pass of both row kernels: y = buf / sum on the visible columns (0 for an empty row),
// 0 past them (causal).
template <typename T>
void normalise_row(const float* buf, const fVec& vsum, T* y, int64_t cols, int64_t visible,
                   bool stream) {
  const fVec vinv(softmax_safe_inv(hsum(vsum)));
  for (int64_t j = 0; j < visible; j += kF) {
    const int64_t n = std::min<int64_t>(kF, visible - j);
    const fVec out = fVec::loadu(buf + j, n) * vinv;
    stream ? store_stream(y + j, out, n) : store_f(y + j, out, n);
  }
  for (int64_t j = visible; j < cols; ++j) y[j] = T(0.f);
}

// Three passes over a row that stays in L1/L2: max of the scores; exp(score - max) into buf
// (fp32) and its sum; buf / sum into y. Columns >= visible (causal) are 0.
template <typename T>
void softmax_row(const T* x, const void* mask, MaskKind kind, T* y, float* buf, int64_t cols,
                 int64_t visible, float scale, bool stream, const T* next, T* next_y) {
  const fVec vscale(scale);
  fVec vmax(kNegInf);
  for (int64_t j = 0; j < visible; j += kF) {
    const int64_t n = std::min<int64_t>(kF, visible - j);
    vmax = at::vec::maximum(vmax, head(score_vec(x, mask, kind, j, n, vscale), n, kNegInf));
  }
  const fVec vrow_max(softmax_safe_max(hmax(vmax)));
  fVec vsum(0.f);
  for (int64_t j = 0; j < visible; j += kF) {
    const int64_t n = std::min<int64_t>(kF, visible - j);
    // Lanes past n are -inf, so they add exp(-inf) = 0 to the sum.
    prefetch_line(next, j);
    prefetch_line_for_write(next_y, j);
    const fVec e = exp_softmax(head(score_vec(x, mask, kind, j, n, vscale), n, kNegInf) - vrow_max);
    e.store(buf + j, n);
    vsum = vsum + e;
  }
  normalise_row(buf, vsum, y, cols, visible, stream);
}

// Above this |scale * max| the folded fma(x, scale, -max) of softmax_row_plain can be off by
// more than 1 (half an ulp of the rounded max): the max column's exp would underflow (logits
// near 5e9: every exp 0, an all-zero row) or overflow. Such rows take softmax_row, whose
// rounded scores make the max column's argument exactly 0.
constexpr float kFoldedMaxLimit = 16777216.f;  // 2^24: ulp 2, error <= 1

// softmax_row without a mask and with scale > 0, which is nearly every call: the max is taken
// over the raw inputs (max(scale * x) = scale * max(x), rounding being monotonic) and the
// scale is folded into the exp's argument, fma(x, scale, -max). Four independent max and two
// sum accumulators: with one, each vector waits on the previous vmaxps / vaddps (4 cycles),
// which made the max pass a third of an in-cache softmax.
template <typename T>
void softmax_row_plain(const T* x, T* y, float* buf, int64_t cols, int64_t visible, float scale,
                       bool stream, const T* next, T* next_y) {
  const fVec ninf(kNegInf);
  fVec m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t j = 0;
  for (; j + 4 * kF <= visible; j += 4 * kF) {
    m0 = at::vec::maximum(m0, load_f(x + j));
    m1 = at::vec::maximum(m1, load_f(x + j + kF));
    m2 = at::vec::maximum(m2, load_f(x + j + 2 * kF));
    m3 = at::vec::maximum(m3, load_f(x + j + 3 * kF));
  }
  for (; j < visible; j += kF) {
    const int64_t n = std::min<int64_t>(kF, visible - j);
    m0 = at::vec::maximum(m0, head(load_f(x + j, n), n, kNegInf));
  }
  const float raw_max = hmax(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
  if (!(std::abs(scale * raw_max) < kFoldedMaxLimit) && raw_max != kNegInf) {
    softmax_row(x, nullptr, MaskKind::kNone, y, buf, cols, visible, scale, stream, next, next_y);
    return;
  }
  const fVec vscale(scale), vneg_max(-softmax_safe_max(scale * raw_max));
  fVec s0(0.f), s1(0.f);
  j = 0;
  for (; j + 2 * kF <= visible; j += 2 * kF) {
    prefetch_line(next, j);
    prefetch_line(next, j + kF);
    prefetch_line_for_write(next_y, j);
    prefetch_line_for_write(next_y, j + kF);
    const fVec e0 = exp_softmax(at::vec::fmadd(load_f(x + j), vscale, vneg_max));
    const fVec e1 = exp_softmax(at::vec::fmadd(load_f(x + j + kF), vscale, vneg_max));
    e0.store(buf + j);
    e1.store(buf + j + kF);
    s0 = s0 + e0;
    s1 = s1 + e1;
  }
  for (; j < visible; j += kF) {
    const int64_t n = std::min<int64_t>(kF, visible - j);
    prefetch_line(next, j);
    prefetch_line_for_write(next_y, j);
    // Lanes past n are -inf, so they add exp(-inf) = 0 to the sum.
    const fVec xv = head(load_f(x + j, n), n, kNegInf);
    const fVec e = exp_softmax(at::vec::fmadd(xv, vscale, vneg_max));
    e.store(buf + j, n);
    s0 = s0 + e;
  }
  normalise_row(buf, s0 + s1, y, cols, visible, stream);
}

template <typename T>
void forward(const SoftmaxParams& p) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.cols, 1));
  // Large outputs are streamed past the cache, so the scores need their own scratch row.
  const bool stream = stream_output(p.rows * p.cols * int64_t(sizeof(T)));
  const bool scratch_in_y = std::is_same_v<T, float> && !stream;
  const bool plain = p.mask_kind == MaskKind::kNone && p.scale > 0.f;
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(scratch_in_y ? 0 : p.cols);
    for (int64_t r = begin; r < end; ++r) {
      const T* x = static_cast<const T*>(p.x) + row_offset(p.x_rows, r);
      T* y = static_cast<T*>(p.y) + r * p.cols;
      const void* mask = nullptr;
      if (p.mask_kind == MaskKind::kFloat) {
        mask = static_cast<const T*>(p.mask) + row_offset(p.mask_rows, r);
      } else if (p.mask_kind == MaskKind::kBool) {
        mask = static_cast<const uint8_t*>(p.mask) + row_offset(p.mask_rows, r);
      }
      const T* next = r + 1 < end ? static_cast<const T*>(p.x) + row_offset(p.x_rows, r + 1)
                                  : nullptr;
      T* next_y = r + 1 < end && !stream ? y + p.cols : nullptr;
      float* buf = scratch_in_y ? reinterpret_cast<float*>(y) : scratch.data();
      const int64_t visible = softmax_visible_cols(r, p.m, p.cols, p.causal);
      if (plain) {
        softmax_row_plain(x, y, buf, p.cols, visible, p.scale, stream, next, next_y);
      } else {
        softmax_row(x, mask, p.mask_kind, y, buf, p.cols, visible, p.scale, stream, next,
                    next_y);
      }
    }
    stream_fence();
  });
}

template <typename T>
void backward(const SoftmaxBackwardParams& p) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.cols, 1));
  const fVec vscale(p.scale);
  const bool stream = stream_output(p.rows * p.cols * int64_t(sizeof(T)));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* dy = static_cast<const T*>(p.dy) + row_offset(p.dy_rows, r);
      const T* y = static_cast<const T*>(p.y) + row_offset(p.y_rows, r);
      T* dx = static_cast<T*>(p.dx) + r * p.cols;
      const bool more = r + 1 < end;
      const T* next_dy = more ? static_cast<const T*>(p.dy) + row_offset(p.dy_rows, r + 1) : nullptr;
      const T* next_y = more ? static_cast<const T*>(p.y) + row_offset(p.y_rows, r + 1) : nullptr;
      T* next_dx = more && !stream ? dx + p.cols : nullptr;
      fVec vdot(0.f);
      for (int64_t j = 0; j < p.cols; j += kF) {
        const int64_t n = std::min<int64_t>(kF, p.cols - j);
        vdot = at::vec::fmadd(load_f(dy + j, n), load_f(y + j, n), vdot);
      }
      const fVec dot(hsum(vdot));
      for (int64_t j = 0; j < p.cols; j += kF) {
        const int64_t n = std::min<int64_t>(kF, p.cols - j);
        prefetch_line(next_dy, j);
        prefetch_line(next_y, j);
        prefetch_line_for_write(next_dx, j);
        const fVec g = softmax_grad(load_f(y + j, n), load_f(dy + j, n), dot, vscale);
        stream ? store_stream(dx + j, g, n) : store_f(dx + j, g, n);
      }
    }
    stream_fence();
  });
}

}  // namespace

void softmax_forward(const SoftmaxParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { forward<decltype(t)>(p); });
}

void softmax_backward(const SoftmaxBackwardParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { backward<decltype(t)>(p); });
}

}  // namespace fastattn::cpu
