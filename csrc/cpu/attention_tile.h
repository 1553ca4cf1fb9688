// Tile helpers shared by the CPU attention forward and backward kernels: task scheduling,
// dtype conversion of tiles, per-row key visibility and score finishing (softcap, masks). The
// GEMMs on the tiles are in gemm.h.
#pragma once

#include "cpu/cpu_capability.h"  // must come first: picks the at::vec width

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/attention.h"
#include "cpu/fast_exp.h"
#include "cpu/gemm.h"

namespace fastattn::cpu::tile {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Runs tasks [0, n) on at::parallel_for's threads, handing out chunks of `grain` tasks from a
// shared counter instead of one fixed range per thread: when a core is shared with other
// processes, a delayed thread no longer holds up the whole call. `make_worker()` is called once
// per thread (scratch set-up) and returns a callable run(task_begin, task_end). Each task's
// arithmetic does not depend on which thread runs it, so results stay deterministic.
template <typename MakeWorker>
inline void parallel_tasks(int64_t n, int64_t grain, const MakeWorker& make_worker) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto run = make_worker();
    for (int64_t c = next.fetch_add(grain); c < n; c = next.fetch_add(grain))
      run(c, std::min(n, c + grain));
  });
}

// A (rows, cols) tile of T with row stride `stride` as fp32. fp32 input is used in place (no
// copy); other dtypes are converted into `scratch` (ld = cols). Returns the pointer and its ld.
template <typename T>
inline const float* as_f32(const T* src, int64_t rows, int64_t cols, int64_t stride,
                           float* scratch, int64_t& ld) {
  // BLAS takes 32-bit leading dims: huge row strides are copied (never in practice).
  if constexpr (std::is_same_v<T, float>) {
    if (stride <= (int64_t{1} << 30)) {
      ld = stride;
      return src;
    }
    for (int64_t r = 0; r < rows; ++r) std::copy_n(src + r * stride, cols, scratch + r * cols);
    ld = cols;
    return scratch;
  } else {
    using VecT = at::vec::Vectorized<T>;
    for (int64_t r = 0; r < rows; ++r) {
      const T* s = src + r * stride;
      float* d = scratch + r * cols;
      int64_t c = 0;
      for (; c + VecT::size() <= cols; c += VecT::size()) {
        auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(s + c));
        lo.store(d + c);
        hi.store(d + c + Vec::size());
      }
      for (; c < cols; ++c) d[c] = static_cast<float>(s[c]);
    }
    ld = cols;
    return scratch;
  }
}

// dst (cols, rows) with ld `ldd` = the transpose of the (rows, cols) tile src, as fp32, with
// ATen's 16x16 register transpose (a plain loop was ~1 ms of a 14 ms causal forward).
template <typename T>
inline void transpose_f32(const T* src, int64_t rows, int64_t cols, int64_t stride, float* dst,
                          int64_t ldd) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float>(src, stride, dst, ldd, static_cast<int>(rows),
                                  static_cast<int>(cols));
  } else {  // convert 16 rows at a time, then transpose them
    thread_local std::vector<float> tmp;
    tmp.resize(16 * cols);
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      const int64_t nr = std::min<int64_t>(16, rows - r0);
      int64_t ld = 0;
      as_f32(src + r0 * stride, nr, cols, stride, tmp.data(), ld);
      at::vec::transpose_mxn<float>(tmp.data(), cols, dst + r0, ldd, static_cast<int>(nr),
                                    static_cast<int>(cols));
    }
  }
}

// dst[0:n) = src[0:n) * mul, converted to T.
template <typename T>
inline void store_row(const float* src, float mul, T* dst, int64_t n) {
  const Vec vm(mul);
  int64_t c = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; c + Vec::size() <= n; c += Vec::size()) (Vec::loadu(src + c) * vm).store(dst + c);
  } else {
    using VecT = at::vec::Vectorized<T>;
    for (; c + VecT::size() <= n; c += VecT::size()) {
      Vec lo = Vec::loadu(src + c) * vm, hi = Vec::loadu(src + c + Vec::size()) * vm;
      at::vec::convert_from_float<T>(lo, hi).store(dst + c);
    }
  }
  for (; c < n; ++c) dst[c] = static_cast<T>(src[c] * mul);
}

// Keys visible to query row i of batch b by the structural rules (causal, window,
// key_lengths) form one interval [lo, hi) with 0 <= lo <= hi <= Sk; both ends never decrease
// with i, so a block of rows sees the union [lo(first row), hi(last row)), also inside [0, Sk].
// lo is clamped to Sk: a row whose window starts past the last key (i + shift - window_left
// >= Sk) sees nothing, and an unclamped lo (hence hi = lo) would carry that row's empty range
// past Sk into its block's union, sending every caller's key loop out of bounds.
struct Interval {
  int64_t lo, hi;
};
inline Interval visible_keys(const AttentionParams& p, int64_t b, int64_t i) {
  const Sequence seq = sequence(p, b);  // per-sequence length and shift in packed mode
  int64_t hi = seq.Sk, lo = 0;
  if (p.key_lengths) hi = std::min(hi, std::max<int64_t>(p.key_lengths[b], 0));
  const int64_t pos = i + seq.shift;
  if (p.causal) hi = std::min(hi, pos + 1);
  if (p.window_right >= 0) hi = std::min(hi, pos + p.window_right + 1);
  if (p.window_left >= 0) lo = std::clamp<int64_t>(pos - p.window_left, 0, p.Sk);
  return {lo, std::max(lo, hi)};
}

template <typename M>
inline void add_mask_row(float* s, const M* m, int64_t stride, int64_t a, int64_t e) {
  if constexpr (std::is_same_v<M, bool>) {
    for (int64_t j = a; j < e; ++j)
      if (!m[j * stride]) s[j] = kNegInf;
  } else if constexpr (std::is_same_v<M, float>) {
    int64_t j = a;
    if (stride == 1)
      for (; j + Vec::size() <= e; j += Vec::size())
        (Vec::loadu(s + j) + Vec::loadu(m + j)).store(s + j);
    for (; j < e; ++j) s[j] += m[j * stride];
  } else {
    for (int64_t j = a; j < e; ++j) s[j] += static_cast<float>(m[j * stride]);
  }
}

// max of x[0:n), n >= 1. Four accumulators: one would wait on vmaxps latency every vector.
inline float row_max(const float* x, int64_t n) {
  const Vec ninf(kNegInf);
  Vec m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + j));
    m1 = at::vec::maximum(m1, Vec::loadu(x + j + V));
    m2 = at::vec::maximum(m2, Vec::loadu(x + j + 2 * V));
    m3 = at::vec::maximum(m3, Vec::loadu(x + j + 3 * V));
  }
  for (; j + V <= n; j += V) m0 = at::vec::maximum(m0, Vec::loadu(x + j));
  if (j < n) m1 = at::vec::maximum(m1, Vec::set(ninf, Vec::loadu(x + j, n - j), n - j));
  const Vec m = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  return at::vec::vec_reduce_all<float>(
      [](const Vec& u, const Vec& w) { return at::vec::maximum(u, w); }, m);
}

// Visible part [a, e) of a row of scores and the max logit in it. The logits are
// mul * s[a:e): finish_scores may leave the score scale for probs() to apply inside its exp.
struct Row {
  float max;
  int64_t a, e;
  float mul = 1.f;
};

// ALiBi on a finished row: s[j] -= slope * |d0 - j| for j in [a, e), d0 = i + shift - j0 (the
// query's diagonal position relative to the tile's first key). Distances are exact integers in
// fp32 and the update is one explicit fma, so the forward and the backward (other tile
// offsets, other vector/tail splits) form bit-identical scores: P = exp(s - lse) stays
// consistent at huge logits.
inline void add_alibi_row(float* s, float slope, int64_t d0, int64_t a, int64_t e) {
  constexpr int64_t V = Vec::size();
  const Vec neg_slope(-slope), iota = Vec::arange(0.f, 1.f);
  for (int64_t j = a; j < e; j += V) {
    const int64_t n = std::min<int64_t>(V, e - j);
    const Vec dist = (Vec(static_cast<float>(d0 - j)) - iota).abs();  // |d0 - j - lane|
    const Vec x = n == V ? Vec::loadu(s + j) : Vec::loadu(s + j, n);
    const Vec y = at::vec::fmadd(neg_slope, dist, x);
    if (n == V) y.store(s + j); else y.store(s + j, n);
  }
}

// Turns the raw scores s[a:e) = q_i . k_j (unscaled) of query i against keys j0 + [a, e) into
// logits: scale, softcap, ALiBi bias, float mask, -inf where a bool mask hides the key (in the plain case
// only the max is computed and Row::mul carries the scale). [a, e) is the
// structurally visible part of keys j0..j0+n; entries outside it are left untouched (probs()
// zeroes them). With softcap, `tanh_out` (if given) receives tanh(scale * s / softcap) for the
// backward's chain rule, 0 outside. The scale is applied here rather than in the GEMM so the
// GEMM can be a plain product (gemm_nn) and the multiply rides on a pass made anyway.
inline Row finish_scores(const AttentionParams& p, int64_t b, int64_t h, int64_t i,
                         int64_t j0, int64_t n, float* s, float* tanh_out = nullptr) {
  const Interval iv = visible_keys(p, b, i);
  const int64_t a = std::clamp<int64_t>(iv.lo - j0, 0, n);
  const int64_t e = std::clamp<int64_t>(iv.hi - j0, a, n);
  if (tanh_out) {  // defined everywhere, so 0 * (1 - t^2) stays 0 for hidden keys
    std::fill(tanh_out, tanh_out + a, 0.f);
    std::fill(tanh_out + e, tanh_out + n, 0.f);
  }
  if (a == e) return {kNegInf, a, e};
  const bool masked = p.mask_kind != MaskKind::kNone;
  // Plain scores: max(scale * s) = scale * max(s) for scale > 0 (rounding is monotonic), and
  // probs() folds the scale into its exp, so the row is not rewritten here.
  if (p.softcap <= 0.f && !masked && p.scale > 0.f && !p.alibi)
    return {p.scale * row_max(s + a, e - a), a, e, p.scale};
  if (p.softcap > 0.f) {
    const float inv_s = p.scale / p.softcap;
    const Vec inv(inv_s), cap(p.softcap);
    int64_t j = a;
    for (; j + Vec::size() <= e; j += Vec::size()) {
      Vec t = (Vec::loadu(s + j) * inv).tanh();
      if (tanh_out) t.store(tanh_out + j);
      (t * cap).store(s + j);
    }
    for (; j < e; ++j) {
      const float t = std::tanh(s[j] * inv_s);
      if (tanh_out) tanh_out[j] = t;
      s[j] = t * p.softcap;
    }
  } else {
    at::vec::map([sc = Vec(p.scale)](Vec x) { return x * sc; }, s + a, s + a, e - a);
  }
  if (p.alibi)  // after softcap: the bias is not capped
    add_alibi_row(s, p.alibi[b * p.H + h], i + sequence(p, b).shift - j0, a, e);
  if (masked) {
    const int64_t off = b * p.m_sb + h * p.m_sh + i * p.m_sq + j0 * p.m_sk;
    if (p.mask_kind == MaskKind::kBool) {
      add_mask_row(s, static_cast<const bool*>(p.mask) + off, p.m_sk, a, e);
    } else {
      switch (p.mask_dtype) {
        case DType::kFloat32:
          add_mask_row(s, static_cast<const float*>(p.mask) + off, p.m_sk, a, e); break;
        case DType::kBFloat16:
          add_mask_row(s, static_cast<const c10::BFloat16*>(p.mask) + off, p.m_sk, a, e); break;
        case DType::kFloat16:
          add_mask_row(s, static_cast<const c10::Half*>(p.mask) + off, p.m_sk, a, e); break;
      }
    }
  }
  return {row_max(s + a, e - a), a, e};
}

// x unchanged, but opaque to the optimiser: the product that made x is rounded and cannot be
// fused into a following add (GCC contracts vector a * b + c into an fma by default).
inline Vec rounded(Vec x) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = x;
  __asm__("" : "+v"(r));
  return Vec(r);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r = x;
  __asm__("" : "+x"(r));
  return Vec(r);
#else
  __asm__ volatile("" : "+m"(x));
  return x;
#endif
}

// Probabilities of a finished row in place: s[a:e) = exp(mul * s - m), 0 elsewhere in [0, n)
// and everywhere when m = -inf (nothing visible). Returns their sum.
inline float probs(float* s, int64_t n, const Row& row, float m) {
  if (m == kNegInf) {
    std::fill(s, s + n, 0.f);
    return 0.f;
  }
  std::fill(s, s + row.a, 0.f);
  std::fill(s + row.e, s + n, 0.f);
  float* x = s + row.a;
  const int64_t len = row.e - row.a;
  const Vec vneg_m(-m), vmul(row.mul);
  // logit - m with the logit rounded first, exactly as m = fl(mul * max raw) was
  // (finish_scores): then the max logit gives exp(0) = 1 and every other exponent is <= 0. An
  // fma (written, or contracted by the compiler from mul + add) subtracts m from the exact
  // product instead, leaving up to half an ulp of the logit in the exponent: +-4096 at logits
  // ~1e11 (scale = 1e10), and exp overflowed to inf or the row summed to 0.
  auto logit_exp = [&](const Vec& raw) { return exp_softmax(rounded(raw * vmul) + vneg_m); };
  Vec acc(0.f), acc1(0.f);
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + 2 * V <= len; j += 2 * V) {
    Vec y0 = logit_exp(Vec::loadu(x + j));
    Vec y1 = logit_exp(Vec::loadu(x + j + V));
    y0.store(x + j);
    y1.store(x + j + V);
    acc = acc + y0;
    acc1 = acc1 + y1;
  }
  acc = acc + acc1;
  for (; j + V <= len; j += V) {
    Vec y = logit_exp(Vec::loadu(x + j));
    y.store(x + j);
    acc = acc + y;
  }
  if (j < len) {  // masked tail: causal rows end anywhere, and scalar expf is slow
    const int64_t rest = len - j;
    Vec y = logit_exp(Vec::loadu(x + j, rest));
    y.store(x + j, rest);
    acc = acc + Vec::set(Vec(0.f), y, rest);
  }
  return at::vec::vec_reduce_all<float>([](const Vec& u, const Vec& w) { return u + w; }, acc);
}

}  // namespace fastattn::cpu::tile
