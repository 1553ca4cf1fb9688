// CPU rotary embedding (NeoX / GPT-J pairs, partial rotary dim, per-batch offsets, conjugate,
// in place, any strides).
#include "cpu/vec.h"  // first: selects the SIMD width

#include <ATen/Parallel.h>

#include "cpu/kernels.h"

namespace fastattn::cpu {
namespace {

// One (b, s, h) row whose last dim is contiguous in x and out.
template <typename T>
void row_contiguous(const T* x, T* out, const float* c, const float* s, int64_t half,
                    int64_t head_dim, bool interleaved, float sign) {
  const fVec vsign(sign);
  int64_t d = 0;
  if (!interleaved) {
    for (; d < half; d += kF) {
      const int64_t n = std::min<int64_t>(kF, half - d);
      fVec oa, ob;
      rotary_rotate(load_f(x + d, n), load_f(x + d + half, n), load_f(c + d, n), load_f(s + d, n) * vsign, oa, ob);
      store_f(out + d, oa, n);
      store_f(out + d + half, ob, n);
    }
  } else {
    for (; d + kF <= half; d += kF) {
      // 2*kF features = kF pairs; split into even/odd lanes and back.
      auto [a, b] = at::vec::deinterleave2(load_f(x + 2 * d), load_f(x + 2 * d + kF));
      fVec oa, ob;
      rotary_rotate(a, b, fVec::loadu(c + d), fVec::loadu(s + d) * vsign, oa, ob);
      auto [lo, hi] = at::vec::interleave2(oa, ob);
      store_f(out + 2 * d, lo);
      store_f(out + 2 * d + kF, hi);
    }
    for (; d < half; ++d) {
      float oa, ob;
      rotary_rotate(static_cast<float>(x[2 * d]), static_cast<float>(x[2 * d + 1]), c[d],
                    s[d] * sign, oa, ob);
      out[2 * d] = T(oa);
      out[2 * d + 1] = T(ob);
    }
  }
  if (out != x) {
    for (d = 2 * half; d < head_dim; d += kF) {
      const int64_t n = std::min<int64_t>(kF, head_dim - d);
      store_f(out + d, load_f(x + d, n), n);
    }
  }
}

// The general case: any element stride in x and out.
template <typename T>
void row_strided(const T* x, int64_t xs, T* out, int64_t os, const float* c, const float* s,
                 int64_t half, int64_t rot_dim, int64_t head_dim, bool interleaved, float sign) {
  for (int64_t d = 0; d < half; ++d) {
    const int64_t i = rotary_first(d, rot_dim, interleaved);
    const int64_t k = rotary_second(d, rot_dim, interleaved);
    float oa, ob;
    rotary_rotate(static_cast<float>(x[i * xs]), static_cast<float>(x[k * xs]), c[d],
                  s[d] * sign, oa, ob);
    out[i * os] = T(oa);
    out[k * os] = T(ob);
  }
  if (out != x) {
    for (int64_t d = rot_dim; d < head_dim; ++d) out[d * os] = x[d * xs];
  }
}

template <typename T>
void forward(const RotaryParams& p) {
  const int64_t rows = p.batch * p.seqlen * p.heads;
  const int64_t half = p.rot_dim / 2;
  const float sign = p.conjugate ? -1.f : 1.f;
  const bool contiguous = p.x_strides[3] == 1 && p.out_strides[3] == 1;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(p.head_dim, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % p.heads, s = (r / p.heads) % p.seqlen, b = r / (p.heads * p.seqlen);
      const int64_t pos = rotary_position(p, b, s);
      const T* x = static_cast<const T*>(p.x) + b * p.x_strides[0] + s * p.x_strides[1] +
                   h * p.x_strides[2];
      T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + s * p.out_strides[1] +
               h * p.out_strides[2];
      const float* c = p.cos + pos * half;
      const float* sn = p.sin + pos * half;
      if (contiguous) {
        row_contiguous(x, out, c, sn, half, p.head_dim, p.interleaved, sign);
      } else {
        row_strided(x, p.x_strides[3], out, p.out_strides[3], c, sn, half, p.rot_dim,
                    p.head_dim, p.interleaved, sign);
      }
    }
  });
}

}  // namespace

void rotary_forward(const RotaryParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { forward<decltype(t)>(p); });
}

}  // namespace fastattn::cpu
