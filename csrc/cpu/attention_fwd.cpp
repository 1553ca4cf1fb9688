// CPU flash-attention forward: one task per (batch, head, block of query rows); keys are visited
// in blocks with an online softmax, so no Sq x Sk buffer exists. Blocks of keys that no row of
// the query block can see (causal, window, key_lengths) are never touched.
#include "cpu/attention_tile.h"

#include <ATen/Parallel.h>

#include <memory>

namespace fastattn::cpu {
namespace {

// Block sizes. Small query blocks keep the wasted half of diagonal causal tiles small (it is
// BQ / Sq of the work); large key blocks keep the GEMMs efficient, and one block spans the
// whole key range for Sk <= kBlockK, so no rescaling of the accumulator happens then.
constexpr int64_t kBlockQ = 32;
constexpr int64_t kBlockK = 512;

template <typename T>
void forward_impl(const AttentionParams& p) {
  const int64_t D = p.D, nqb = (p.Sq + kBlockQ - 1) / kBlockQ, group = p.H / p.Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);

  at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch: converted q/k/v tiles (low precision only), scores, accumulator.
    const int64_t n_scratch = kBlockQ * kBlockK + kBlockQ * D + (kBlockQ + 2 * kBlockK) * D;
    std::unique_ptr<float[]> scratch(new float[n_scratch]);
    float* sbuf = scratch.get();             // (BQ, BK) scores, then probabilities
    float* acc = sbuf + kBlockQ * kBlockK;   // (BQ, D) unnormalised output
    float* qs = acc + kBlockQ * D;           // conversion scratch
    float* ks = qs + kBlockQ * D;
    float* vs = ks + kBlockK * D;
    float row_max[kBlockQ], row_sum[kBlockQ];

    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb, bh = task / nqb, h = bh % p.H, b = bh / p.H;
      const int64_t hk = h / group;
      const int64_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, p.Sq - i0);
      const int64_t klo = tile::visible_keys(p, b, i0).lo;
      const int64_t khi = tile::visible_keys(p, b, i0 + nq - 1).hi;

      std::fill(acc, acc + nq * D, 0.f);
      std::fill(row_max, row_max + nq, tile::kNegInf);
      std::fill(row_sum, row_sum + nq, 0.f);

      int64_t ldq = 0;
      const float* qt = khi > klo
          ? tile::as_f32(q + b * p.q_sb + h * p.q_sh + i0 * p.q_ss, nq, D, p.q_ss, qs, ldq)
          : nullptr;
      for (int64_t j0 = klo; j0 < khi; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, khi - j0);
        int64_t ldk = 0, ldv = 0;
        const float* kt = tile::as_f32(k + b * p.k_sb + hk * p.k_sh + j0 * p.k_ss, nk, D,
                                       p.k_ss, ks, ldk);
        const float* vt = tile::as_f32(v + b * p.v_sb + hk * p.v_sh + j0 * p.v_ss, nk, D,
                                       p.v_ss, vs, ldv);
        // S = scale * Q K^T  (nq, nk)
        tile::gemm(false, true, nq, nk, D, p.scale, qt, ldq, kt, ldk, 0.f, sbuf, kBlockK);
        for (int64_t r = 0; r < nq; ++r) {
          float* s = sbuf + r * kBlockK;
          const float mx = tile::finish_scores(p, b, h, i0 + r, j0, nk, s);
          const float m_new = std::max(row_max[r], mx);
          if (m_new == tile::kNegInf) {  // nothing visible yet in this row
            std::fill(s, s + nk, 0.f);
            continue;
          }
          const float sum = tile::exp_row(s, nk, m_new);
          if (row_max[r] != m_new && row_sum[r] > 0.f) {
            const float corr = std::exp(row_max[r] - m_new);
            row_sum[r] *= corr;
            float* o = acc + r * D;
            at::vec::map([corr](tile::Vec x) { return x * tile::Vec(corr); }, o, o, D);
          }
          row_sum[r] += sum;
          row_max[r] = m_new;
        }
        // acc += P V  (nq, D)
        tile::gemm(false, false, nq, D, nk, 1.f, sbuf, kBlockK, vt, ldv, 1.f, acc, D);
      }

      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        const bool empty = !(row_sum[r] > 0.f);
        tile::store_row(acc + r * D, empty ? 0.f : 1.f / row_sum[r],
                        out + b * p.o_sb + h * p.o_sh + i * p.o_ss, D);
        p.lse[(b * p.H + h) * p.Sq + i] =
            empty ? tile::kNegInf : row_max[r] + std::log(row_sum[r]);
      }
    }
  });
}

}  // namespace

void attention_forward(const AttentionParams& p) {
  switch (p.dtype) {
    case DType::f32: forward_impl<float>(p); break;
    case DType::bf16: forward_impl<c10::BFloat16>(p); break;
    case DType::f16: forward_impl<c10::Half>(p); break;
  }
}

}  // namespace fastattn::cpu
