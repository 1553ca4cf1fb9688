// SIMD helpers for the CPU kernels: picks at::vec's widest implementation the compiler
// targets and loads/stores fp32/fp16/bf16 rows as fp32 vectors.
#pragma once

#include "cpu/cpu_capability.h"  // first: sets CPU_CAPABILITY for at::vec

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include <cstdlib>
#include <unistd.h>

#include "common/types.h"

namespace fastattn::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kF = fVec::size();

inline void load_fp32(const at::BFloat16* p, fVec& out) { at::vec::load_fp32_from_bf16(p, out); }
inline void load_fp32(const at::Half* p, fVec& out) { at::vec::load_fp32_from_fp16(p, out); }

// kF elements of T as fp32.
template <typename T>
inline fVec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec out;
    load_fp32(p, out);
    return out;
  }
}

// n <= kF elements of T as fp32, the rest of the lanes 0 (a full vector takes load_f(p)).
template <typename T>
inline fVec load_f(const T* p, int64_t n) {
  if (n == kF) return load_f(p);
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p, n);
  } else {
    __at_align__ float buf[kF] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return fVec::loadu(buf);
  }
}

// Stores the first n lanes of v (rounded to T).
template <typename T>
inline void store_f(T* p, const fVec& v, int64_t n = kF) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

// Whether an output of `bytes` is written with non-temporal stores: only when it is larger than
// a quarter of the last-level cache (glibc's memcpy draws its line there too), since it then
// will not stay cached for the next op anyway and skipping the read-for-ownership cuts its
// memory traffic by a third. A fixed 4 MiB line sent 16 MiB softmax/LayerNorm outputs on a
// 480 MiB-L3 machine to DRAM (20 GB/s) instead of keeping them in L3 (~45 GB/s when the
// machine is quiet). FASTATTN_CPU_STREAM_BYTES overrides the line (the tests use it to cover
// the streaming path).
inline bool stream_output(int64_t bytes) {
  static const int64_t threshold = [] {
    if (const char* env = std::getenv("FASTATTN_CPU_STREAM_BYTES")) return int64_t(std::atoll(env));
    const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return llc > 0 ? static_cast<int64_t>(llc) / 4 : int64_t(8) << 20;
  }();
  return bytes > threshold;
}

// Like store_f, but a full vector at a suitably aligned address bypasses the cache.
// Call stream_fence() before the written data is handed to another thread.
template <typename T>
inline void store_stream(T* p, const fVec& v, int64_t n = kF) {
#if defined(CPU_CAPABILITY_AVX512)
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (n == kF) {
    if constexpr (std::is_same_v<T, float>) {
      if ((addr & 63) == 0) return _mm512_stream_ps(p, __m512(v));
    } else {
      if ((addr & 31) == 0) {
        const __m512i w = at::vec::convert_from_float<T>(v, v);
        return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(w));
      }
    }
  }
#endif
  store_f(p, v, n);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Asks for the cache line holding element j of `row`, a row processed next (nothing when row
// is nullptr: no next row). Rows of 4 KiB or more start on a new page, where the hardware
// prefetcher stops, so each row would otherwise begin with a memory-latency stall. Issued one
// line per vector inside a compute loop, so the requests overlap with work instead of filling
// the miss queue all at once.
template <typename T>
inline void prefetch_line(const T* row, int64_t j) {
  if (row != nullptr) __builtin_prefetch(row + j, 0, 3);
}

// Asks for ownership of the line holding element j of `row`, an output row written next
// (prefetchw; nothing when row is nullptr): rows of 4 KiB or more start on a new page, so
// without it each row's first stores wait on their read-for-ownership. Measured 5-15% on 16 MiB softmax/LayerNorm outputs. Not for streamed
// outputs: non-temporal stores need no ownership.
template <typename T>
inline void prefetch_line_for_write(T* row, int64_t j) {
  if (row != nullptr) __builtin_prefetch(row + j, 1, 3);
}

// Lanes [0, n) of v, the rest `fill` (for reductions over a partial vector).
inline fVec head(const fVec& v, int64_t n, float fill) {
  if (n == kF) return v;
  __at_align__ float buf[kF];
  v.store(buf);
  for (int64_t i = n; i < kF; ++i) buf[i] = fill;
  return fVec::loadu(buf);
}

inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}
inline float hmax(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, v);
}

}  // namespace fastattn::cpu

namespace fastattn::cpu {

// Calls f(T{}) with T the C++ element type of d.
template <typename F>
inline void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(at::Half{}); break;
    case DType::kBFloat16: f(at::BFloat16{}); break;
  }
}

}  // namespace fastattn::cpu
