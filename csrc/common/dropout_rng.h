// Counter-based dropout RNG shared by the CPU kernels and (later) CUDA kernels: the keep decision
// for the attention probability (b, h, i, j) is a pure function of (seed, offset, linear index
// ((b*H + h)*Sq + i)*Sk + j), so a backward pass regenerates the forward's mask exactly, with no
// state and in any order.
//
// Definition (tests re-implement it; change both together):
//   key   = splitmix64(splitmix64(seed) ^ offset);  k0 = low 32 bits, k1 = high 32 bits
//   bits  = mix32(mix32(lo ^ k0) + mix32(hi ^ k1))   for idx = hi * 2^32 + lo
//   u     = (bits >> 8) * 2^-24 in [0, 1);  keep iff u >= p,
//           i.e. (bits >> 8) >= threshold = ceil(p * 2^24).
// splitmix64 is Steele/Lea/Flood's finaliser; mix32 uses the "lowbias32" multipliers found by
// C. Wellons' hash prospector. The seed and offset go through the key (not added to the
// counter) so that nearby offsets give unrelated masks rather than shifted copies.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/types.h"

namespace fastattn {

struct DropoutKey {
  uint32_t k0 = 0, k1 = 0;
  uint32_t threshold = 0;  // keep iff (bits >> 8) >= threshold; 0 keeps everything
};

FA_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

FA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// p in [0, 1).
FA_HD DropoutKey dropout_key(int64_t seed, int64_t offset, double p) {
  const uint64_t key = splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^
                                  static_cast<uint64_t>(offset));
  DropoutKey k;
  k.k0 = static_cast<uint32_t>(key);
  k.k1 = static_cast<uint32_t>(key >> 32);
  const double t = std::ceil(p * 16777216.0);  // 2^24
  k.threshold = t <= 0.0 ? 0u : (t >= 16777216.0 ? 16777216u : static_cast<uint32_t>(t));
  return k;
}

// The part of the hash that depends only on the high word of the index (constant over 2^32
// consecutive elements, so vector code computes it once per chunk).
FA_HD uint32_t dropout_salt(const DropoutKey& k, uint32_t hi) { return mix32(hi ^ k.k1); }

FA_HD bool dropout_keep_lo(const DropoutKey& k, uint32_t salt, uint32_t lo) {
  return (mix32(mix32(lo ^ k.k0) + salt) >> 8) >= k.threshold;
}

FA_HD bool dropout_keep(const DropoutKey& k, uint64_t idx) {
  return dropout_keep_lo(k, dropout_salt(k, static_cast<uint32_t>(idx >> 32)),
                         static_cast<uint32_t>(idx));
}

}  // namespace fastattn
