// CPU KV-cache (decoding) attention: parameters and entry point (torch-free). The torch-facing
// csrc/kvcache_attention.cpp checks arguments (every index the kernel follows lies inside the
// cache) and fills this struct.
#pragma once

#include <cstdint>

#include "common/types.h"

namespace fastattn::cpu {

// Strides are in elements; the head dim (last dim) of q, caches and out is contiguous.
struct KVCacheParams {
  DType dtype = DType::kFloat32;  // q, caches and out
  int64_t B = 0, Sq = 0, H = 0, Hkv = 0, D = 0;

  const void* q = nullptr;                 // (B, Sq, H, D)
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;
  // Caches: (pages, rows per page, Hkv, D). A contiguous cache (B_cache, S_max, Hkv, D) is one
  // page per batch row (block_size = S_max), picked by cache_batch_idx[b] (or b).
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_sp = 0, k_sr = 0, k_sh = 0;
  int64_t v_sp = 0, v_sr = 0, v_sh = 0;
  int64_t block_size = 0;
  const int32_t* block_table = nullptr;    // (B, bt_stride) or null (contiguous cache)
  int64_t bt_stride = 0;
  const int32_t* cache_batch_idx = nullptr;  // (B,) or null

  // Batch b attends to cache positions [0, cache_seqlens[b] + seqlen_new), bottom-right.
  const int32_t* cache_seqlens = nullptr;  // (B,)
  int64_t seqlen_new = 0;

  float scale = 1.f;
  float softcap = 0.f;                     // 0 = off
  bool causal = true;
  int64_t window_left = -1, window_right = -1;
  // ALiBi slopes (B, H) fp32 contiguous, per query head, or null: score of query i against
  // key n gets - slope[b, h] * |len - Sq + i - n| (len = cache_seqlens[b] + seqlen_new).
  const float* alibi = nullptr;

  void* out = nullptr;                     // (B, Sq, H, D), q's dtype
  int64_t o_sb = 0, o_ss = 0, o_sh = 0;
  float* lse = nullptr;                    // (B, H, Sq) contiguous fp32
};

void kvcache_attention_forward(const KVCacheParams& p);

}  // namespace fastattn::cpu
