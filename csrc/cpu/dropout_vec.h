// 16 lanes at a time of the dropout RNG of common/dropout_rng.h, for the CPU attention kernels
// and the mask op. GCC/Clang vector extensions: the same unsigned 32-bit wrapping arithmetic as
// the scalar code (so bitwise the same decisions), compiled to AVX-512, AVX2 or SSE as targeted.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/dropout_rng.h"

// Vectors go by reference: passing 64-byte vectors by value draws GCC's -Wpsabi note when
// AVX-512 is off (FASTATTN_PORTABLE=1), and a pragma does not silence it.
namespace fastattn::cpu::dropout {

constexpr int64_t kLanes = 16;
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));
typedef float F32x16 __attribute__((vector_size(64)));

inline void mix32(U32x16& x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
}

// All-ones lanes where index (hi, lo0 + lane) is kept. The caller makes sure lo0 + 15 does not
// wrap (so hi is the same for all lanes).
inline void keep_lanes(const DropoutKey& k, uint32_t salt, uint32_t lo0, U32x16& keep) {
  const U32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  U32x16 bits = (lo0 + iota) ^ k.k0;
  mix32(bits);
  bits += salt;
  mix32(bits);
  // Values are < 2^24 on both sides: a signed compare is exact and native on AVX2.
  keep = (U32x16)((I32x16)(bits >> 8) >= static_cast<int32_t>(k.threshold));
}

// Walks [a, e) of the row whose element j has linear index base + j in chunks of 16 lanes,
// calling chunk(j, n, keep) (keep by const reference) with keep's first n lanes valid. Chunks whose low word would wrap
// (once per 2^32 elements) are evaluated lane by lane with the scalar definition.
template <typename Chunk>
inline void for_each_chunk(const DropoutKey& k, uint64_t base, int64_t a, int64_t e,
                           const Chunk& chunk) {
  uint32_t cur_hi = static_cast<uint32_t>((base + a) >> 32);
  uint32_t salt = dropout_salt(k, cur_hi);
  for (int64_t j = a; j < e; j += kLanes) {
    const int64_t n = e - j < kLanes ? e - j : kLanes;
    const uint64_t idx = base + static_cast<uint64_t>(j);
    const uint32_t lo = static_cast<uint32_t>(idx), hi = static_cast<uint32_t>(idx >> 32);
    if (hi != cur_hi) {
      cur_hi = hi;
      salt = dropout_salt(k, hi);
    }
    U32x16 keep = {};
    if (lo <= UINT32_MAX - (kLanes - 1)) {
      keep_lanes(k, salt, lo, keep);
    } else {
      for (int l = 0; l < kLanes; ++l)
        keep[l] = dropout_keep(k, idx + static_cast<uint64_t>(l)) ? UINT32_MAX : 0u;
    }
    chunk(j, n, keep);
  }
}

// dst[j] = keep(base + j) ? src[j] * mul : 0 for j in [a, e). src may be dst.
inline void apply_row(const DropoutKey& k, uint64_t base, const float* src, float mul,
                      float* dst, int64_t a, int64_t e) {
  for_each_chunk(k, base, a, e, [&](int64_t j, int64_t n, const U32x16& keep) {
    if (n == kLanes) {
      F32x16 v;
      std::memcpy(&v, src + j, sizeof(v));
      const U32x16 r = (U32x16)(v * mul) & keep;  // vector casts are bit casts
      std::memcpy(dst + j, &r, sizeof(r));
    } else {
      for (int64_t l = 0; l < n; ++l) dst[j + l] = keep[l] ? src[j + l] * mul : 0.f;
    }
  });
}

// dst[j] = keep(base + j) for j in [0, n).
inline void mask_row(const DropoutKey& k, uint64_t base, bool* dst, int64_t n) {
  for_each_chunk(k, base, 0, n, [&](int64_t j, int64_t len, const U32x16& keep) {
    for (int64_t l = 0; l < len; ++l) dst[j + l] = keep[l] != 0;
  });
}

}  // namespace fastattn::cpu::dropout
