// CPU flash-attention forward: one task per (batch, head, block of query rows); keys are visited
// in blocks with an online softmax, so no Sq x Sk buffer exists. Blocks of keys that no row of
// the query block can see (causal, window, key_lengths) are never touched.
#include "cpu/attention_tile.h"
#include "cpu/dropout_vec.h"

#include <ATen/Parallel.h>

#include <memory>
#include <vector>

namespace fastattn::cpu {
namespace {

// Block sizes, tuned at (B,H,S,D) = (4,8,512,64) fp32. One key block spans the whole key range
// for Sk <= 512 (no rescaling of the accumulator then; GEMMs as large as SDPA's). BQ = 64 beat
// 32 and 48 (larger GEMMs) although it wastes more of the causal diagonal tile; half of that
// waste is skipped by splitting the diagonal tile (see below). 128 was no faster.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 512;

template <typename T>
void forward_impl(const AttentionParams& p) {
  const int64_t D = p.D, nqb = (p.Sq + kBlockQ - 1) / kBlockQ, group = p.H / p.Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);

  const int64_t nkb = (p.Sk + kBlockK - 1) / kBlockK;
  // Each thread keeps K^T (and fp32 V for low precision) of the head it is working on, one
  // (D, BK) panel per key block, built on first use: the tasks of one thread are consecutive
  // query blocks of the same head, so each panel is built about once per head and thread.
  // K^T is a plain row-major operand for gemm_nn (brgemm reads it in place, and MKL picks its
  // no-copy kernel for it), built once per head instead of once per query block. Heads too
  // long to cache get one rebuilt panel.
  const bool cache_all = nkb * kBlockK * D <= (int64_t{1} << 22);  // <= 16 MB per thread
  const int64_t nslots = cache_all ? nkb : 1;
  // fp32 V is read in place unless its row stride is too large for MKL's 32-bit ld.
  const bool v_direct = std::is_same_v<T, float> && p.v_ss <= (int64_t{1} << 30);

  const int64_t n_tasks = p.B * p.H * nqb;
  // Chunks of one head's query blocks keep the K^T cache warm; smaller when heads are few.
  const int64_t grain = std::max<int64_t>(
      1, std::min<int64_t>(nqb, n_tasks / (4 * at::get_num_threads())));
  // Per-thread scratch: scores, accumulator, converted q, K^T / V panels.
  const int64_t n_scratch =
      kBlockQ * kBlockK + 2 * kBlockQ * D + (v_direct ? 1 : 2) * nslots * kBlockK * D;

  tile::parallel_tasks(n_tasks, grain, [&] {
    return [&, scratch = std::unique_ptr<float[]>(new float[n_scratch]),
            ready = std::vector<char>(nslots, 0),
            cached_head = int64_t{-1}](int64_t begin, int64_t end) mutable {
      float* sbuf = scratch.get();             // (BQ, BK) scores, then probabilities
      float* acc = sbuf + kBlockQ * kBlockK;   // (BQ, D) unnormalised output
      float* qs = acc + kBlockQ * D;           // (BQ, D) converted q
      float* kpanels = qs + kBlockQ * D;       // nslots x (D, BK) K^T
      float* vpanels = kpanels + nslots * kBlockK * D;  // nslots x (BK, D) fp32 V
      float row_max[kBlockQ], row_sum[kBlockQ];

      for (int64_t task = begin; task < end; ++task) {
        const int64_t qb = task % nqb, bh = task / nqb, h = bh % p.H, b = bh / p.H;
        const int64_t hk = h / group;
        const Sequence seq = sequence(p, b);  // packed mode: this sequence's rows and length
        const int64_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, seq.Sq - i0);
        if (nq <= 0) continue;                // query block past a shorter sequence's end
        const int64_t klo = tile::visible_keys(p, b, i0).lo;
        const int64_t khi = tile::visible_keys(p, b, i0 + nq - 1).hi;
        const int64_t half = nq / 2, khi_top = tile::visible_keys(p, b, i0 + half - 1).hi;
        if (b * p.Hkv + hk != cached_head) {
          cached_head = b * p.Hkv + hk;
          std::fill(ready.begin(), ready.end(), 0);
        }

        std::fill(acc, acc + nq * D, 0.f);
        std::fill(row_max, row_max + nq, tile::kNegInf);
        std::fill(row_sum, row_sum + nq, 0.f);

        int64_t ldq = 0;
        const float* qt = khi > klo
            ? tile::as_f32(q + b * p.q_sb + h * p.q_sh + (seq.q0 + i0) * p.q_ss, nq, D, p.q_ss, qs, ldq)
            : nullptr;
        for (int64_t j0 = klo; j0 < khi;) {
          const int64_t kb = j0 / kBlockK, kb0 = kb * kBlockK;
          const int64_t nk = std::min((kb + 1) * kBlockK, khi) - j0;
          const int64_t slot = cache_all ? kb : 0;
          float* kpanel = kpanels + slot * kBlockK * D;
          float* vpanel = vpanels + slot * kBlockK * D;
          if (!cache_all || !ready[slot]) {
            const int64_t nkb_rows = std::min(kBlockK, seq.Sk - kb0);
            tile::transpose_f32(k + b * p.k_sb + hk * p.k_sh + (seq.k0 + kb0) * p.k_ss, nkb_rows, D, p.k_ss,
                                kpanel, kBlockK);
            if (!v_direct) {
              const T* vsrc = v + b * p.v_sb + hk * p.v_sh + (seq.k0 + kb0) * p.v_ss;
              if constexpr (std::is_same_v<T, float>) {
                for (int64_t r = 0; r < nkb_rows; ++r)
                  std::copy_n(vsrc + r * p.v_ss, D, vpanel + r * D);
              } else {
                int64_t ld = 0;
                tile::as_f32(vsrc, nkb_rows, D, p.v_ss, vpanel, ld);
              }
            }
            ready[slot] = 1;
          }
          const float* kt = kpanel + (j0 - kb0);  // (D, nk), ld BK
          int64_t ldv = D;
          const float* vt = vpanel + (j0 - kb0) * D;
          if (v_direct) {
            vt = reinterpret_cast<const float*>(v + b * p.v_sb + hk * p.v_sh +
                                                (seq.k0 + j0) * p.v_ss);
            ldv = p.v_ss;
          }
          // S = Q K^T  (nq, nk), unscaled (finish_scores scales). The top half of the rows
          // sees no key at or past khi_top (causal diagonal), so columns [split, nk) are
          // computed for the bottom half only: half of the diagonal tile's waste is skipped.
          // Top rows never read them.
          const int64_t split = std::clamp<int64_t>(khi_top - j0, 0, nk);
          gemm_nn(nq, split, D, qt, ldq, kt, kBlockK, sbuf, kBlockK, false);
          gemm_nn(nq - half, nk - split, D, qt + half * ldq, ldq, kt + split, kBlockK,
                  sbuf + half * kBlockK + split, kBlockK, false);
          for (int64_t r = 0; r < nq; ++r) {
            float* s = sbuf + r * kBlockK;
            const tile::Row row = tile::finish_scores(p, b, h, i0 + r, j0, nk, s);
            const float m_new = std::max(row_max[r], row.max);
            const float sum = tile::probs(s, nk, row, m_new);
            if (m_new == tile::kNegInf) continue;  // nothing visible yet in this row
            // Dropout zeroes P after its sum is taken (lse is of the undropped P); the
            // 1 / (1 - p) scale is applied with the final normalisation.
            if (p.dropout)
              dropout::apply_row(p.dropout_key,
                                 static_cast<uint64_t>(((b * p.H + h) * p.Sq + i0 + r) * p.Sk + j0),
                                 s, 1.f, s, row.a, row.e);
            if (row_max[r] != m_new && row_sum[r] > 0.f) {
              const float corr = std::exp(row_max[r] - m_new);
              row_sum[r] *= corr;
              float* o = acc + r * D;
              at::vec::map([corr](tile::Vec x) { return x * tile::Vec(corr); }, o, o, D);
            }
            row_sum[r] += sum;
            row_max[r] = m_new;
          }
          // acc += P V  (nq, D), with the same split (top rows' P is 0 past `split`).
          gemm_nn(nq, D, split, sbuf, kBlockK, vt, ldv, acc, D, true);
          gemm_nn(nq - half, D, nk - split, sbuf + half * kBlockK + split, kBlockK,
                  vt + split * ldv, ldv, acc + half * D, D, true);
          j0 += nk;
        }

        for (int64_t r = 0; r < nq; ++r) {
          const int64_t i = i0 + r;
          const bool empty = !(row_sum[r] > 0.f);
          tile::store_row(acc + r * D, empty ? 0.f : p.dropout_scale / row_sum[r],
                          out + b * p.o_sb + h * p.o_sh + (seq.q0 + i) * p.o_ss, D);
          p.lse[lse_index(p, b, h, i)] =
              empty ? tile::kNegInf : row_max[r] + std::log(row_sum[r]);
        }
      }
    };
  });
}

}  // namespace

void attention_dropout_mask(const AttentionParams& p, bool* keep) {
  at::parallel_for(0, p.B * p.H * p.Sq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      dropout::mask_row(p.dropout_key, static_cast<uint64_t>(row * p.Sk), keep + row * p.Sk,
                        p.Sk);
  });
}

void attention_forward(const AttentionParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: forward_impl<float>(p); break;
    case DType::kBFloat16: forward_impl<c10::BFloat16>(p); break;
    case DType::kFloat16: forward_impl<c10::Half>(p); break;
  }
}

}  // namespace fastattn::cpu
