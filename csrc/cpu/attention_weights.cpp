// CPU attention probabilities for need_weights=True: P = exp(finish(q k^T) - lse) from the
// forward's saved lse, so no softmax pass is needed. Written per head (B, H, Sq, Sk) or averaged
// over heads (B, Sq, Sk) straight from fp32 tile sums, so the per-head tensor never exists.
// Keys that no row of a query block can see (causal, window, key_lengths) are not computed.
#include "cpu/attention_tile.h"

#include <ATen/Parallel.h>

#include <memory>
#include <vector>

namespace fastattn::cpu {
namespace {

// The forward's tile shape: one key block spans Sk <= 512, GEMMs like the forward's.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 512;

template <typename T>
void weights_impl(const AttentionParams& p, bool average, T* out) {
  const int64_t D = p.D, Sk = p.Sk, group = p.H / p.Hkv;
  const int64_t nqb = (p.Sq + kBlockQ - 1) / kBlockQ, nkb = (Sk + kBlockK - 1) / kBlockK;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  // K^T panels (D, BK) of every kv head of the batch a thread works on, built on first use: a
  // task is (batch, query block) with all heads (the head mean needs no atomics), and a
  // thread's tasks are consecutive query blocks of one batch.
  const bool cache_all = p.Hkv * nkb * kBlockK * D <= (int64_t{1} << 22);  // <= 16 MB
  const int64_t nslots = cache_all ? p.Hkv * nkb : 1;
  const int64_t acc_numel = average ? kBlockQ * Sk : 0;
  const int64_t n_scratch = kBlockQ * kBlockK + kBlockQ * D + nslots * kBlockK * D + acc_numel;
  const float inv_heads = 1.f / static_cast<float>(p.H);

  tile::parallel_tasks(p.B * nqb, nqb, [&] {
    return [&, scratch = std::unique_ptr<float[]>(new float[n_scratch]),
            ready = std::vector<char>(nslots, 0),
            cached_b = int64_t{-1}](int64_t begin, int64_t end) mutable {
      float* sbuf = scratch.get();                // (BQ, BK) scores, then probabilities
      float* qs = sbuf + kBlockQ * kBlockK;       // (BQ, D) converted q
      float* panels = qs + kBlockQ * D;           // nslots x (D, BK) K^T
      float* acc = panels + nslots * kBlockK * D; // (BQ, Sk) head sum (average only)

      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nqb, qb = task % nqb;
        const int64_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, p.Sq - i0);
        const int64_t klo = tile::visible_keys(p, b, i0).lo;
        const int64_t khi = tile::visible_keys(p, b, i0 + nq - 1).hi;
        if (b != cached_b) {
          cached_b = b;
          std::fill(ready.begin(), ready.end(), 0);
        }
        if (average) std::fill_n(acc, nq * Sk, 0.f);

        for (int64_t h = 0; h < p.H; ++h) {
          const int64_t hk = h / group;
          const float* lse = p.lse + (b * p.H + h) * p.Sq + i0;
          T* dst = average ? nullptr : out + ((b * p.H + h) * p.Sq + i0) * Sk;
          if (!average) {  // invisible columns of the whole block
            for (int64_t r = 0; r < nq; ++r) {
              std::fill(dst + r * Sk, dst + r * Sk + klo, T(0.f));
              std::fill(dst + r * Sk + khi, dst + (r + 1) * Sk, T(0.f));
            }
          }
          if (khi <= klo) continue;
          int64_t ldq = 0;
          const float* qt =
              tile::as_f32(q + b * p.q_sb + h * p.q_sh + i0 * p.q_ss, nq, D, p.q_ss, qs, ldq);
          for (int64_t j0 = klo; j0 < khi;) {
            const int64_t kb = j0 / kBlockK, kb0 = kb * kBlockK;
            const int64_t nk = std::min(kb0 + kBlockK, khi) - j0;
            const int64_t slot = cache_all ? hk * nkb + kb : 0;
            float* panel = panels + slot * kBlockK * D;
            if (!cache_all || !ready[slot]) {
              tile::transpose_f32(k + b * p.k_sb + hk * p.k_sh + kb0 * p.k_ss,
                                  std::min(kBlockK, Sk - kb0), D, p.k_ss, panel, kBlockK);
              ready[slot] = 1;
            }
            // S = Q K^T (nq, nk), then P = exp(finish(S) - lse) row by row.
            gemm_nn(nq, nk, D, qt, ldq, panel + (j0 - kb0), kBlockK, sbuf, kBlockK, false);
            for (int64_t r = 0; r < nq; ++r) {
              float* s = sbuf + r * kBlockK;
              const tile::Row row = tile::finish_scores(p, b, h, i0 + r, j0, nk, s);
              tile::probs(s, nk, row, lse[r]);  // lse = -inf (no visible key): all 0
              if (average) {
                float* a = acc + r * Sk + j0;
                at::vec::map2([](tile::Vec x, tile::Vec y) { return x + y; }, a, a, s, nk);
              } else {
                tile::store_row(s, 1.f, dst + r * Sk + j0, nk);
              }
            }
            j0 += nk;
          }
        }
        if (average) {
          for (int64_t r = 0; r < nq; ++r)
            tile::store_row(acc + r * Sk, inv_heads, out + (b * p.Sq + i0 + r) * Sk, Sk);
        }
      }
    };
  });
}

}  // namespace

void attention_weights(const AttentionParams& p, bool average, void* out) {
  switch (p.dtype) {
    case DType::kFloat32: weights_impl(p, average, static_cast<float*>(out)); break;
    case DType::kBFloat16: weights_impl(p, average, static_cast<c10::BFloat16*>(out)); break;
    case DType::kFloat16: weights_impl(p, average, static_cast<c10::Half*>(out)); break;
  }
}

}  // namespace fastattn::cpu
