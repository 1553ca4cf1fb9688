// CPU SwiGLU: out = silu(gate) * up, silu(g) = g * sigmoid(g), and its backward
//   dgate = dy * up * sig * (1 + g * (1 - sig)),  dup = dy * silu(g).
// One pass over memory each way (forward reads gate and up and writes out; backward reads dy,
// gate and up and writes dgate and dup), fp32 math, one rounding to the output dtype.
#include "cpu/vec.h"  // first: selects the SIMD width

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/fast_exp.h"
#include "cpu/swiglu.h"

namespace fastattn::cpu {
namespace {

// Elements per parallel task: ~64-192 KiB of traffic per task, so a 2-core split of a 1M-element
// tensor gets 2+ tasks while small calls (one HF token) stay on the calling thread.
constexpr int64_t kGrain = 16384;

// sigmoid(g) = 1 / (1 + exp(-g)). exp_softmax clamps its argument to [-110, 88]: for g < -88
// sig is ~1e-38 instead of ~0 (an absolute error far below one fp32 ulp of 1), for g > 110
// exp(-g) = 0 and sig = 1 exactly; NaN stays NaN.
inline fVec sigmoid_vec(const fVec& g) {
  const fVec one(1.f);
  return one / (one + exp_softmax(fVec(0.f) - g));
}

inline float sigmoid_scalar(float g) { return 1.f / (1.f + std::exp(-g)); }

template <typename T>
void forward_range(const T* gate, const T* up, T* out, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + kF <= end; i += kF) {
    const fVec g = load_f(gate + i);
    const fVec u = load_f(up + i);
    store_f(out + i, g * sigmoid_vec(g) * u);
  }
  if (i < end) {
    const int64_t n = end - i;
    const fVec g = load_f(gate + i, n);
    const fVec u = load_f(up + i, n);
    store_f(out + i, g * sigmoid_vec(g) * u, n);
  }
}

template <typename T>
void backward_range(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t begin,
                    int64_t end) {
  const fVec one(1.f);
  auto step = [&](int64_t i, int64_t n) {
    const fVec d = load_f(dy + i, n);
    const fVec g = load_f(gate + i, n);
    const fVec u = load_f(up + i, n);
    const fVec sig = sigmoid_vec(g);
    const fVec silu = g * sig;
    store_f(dup + i, d * silu, n);
    store_f(dgate + i, d * u * sig * (one + g * (one - sig)), n);
  };
  int64_t i = begin;
  for (; i + kF <= end; i += kF) step(i, kF);
  if (i < end) step(i, end - i);
}

}  // namespace

void swiglu_forward(const SwigluParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gate = static_cast<const T*>(p.gate);
    const T* up = static_cast<const T*>(p.up);
    T* out = static_cast<T*>(p.out);
    at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
      forward_range(gate, up, out, begin, end);
    });
  });
}

void swiglu_backward(const SwigluBackwardParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* dy = static_cast<const T*>(p.dy);
    const T* gate = static_cast<const T*>(p.gate);
    const T* up = static_cast<const T*>(p.up);
    T* dgate = static_cast<T*>(p.dgate);
    T* dup = static_cast<T*>(p.dup);
    at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
      backward_range(dy, gate, up, dgate, dup, begin, end);
    });
  });
}

}  // namespace fastattn::cpu
