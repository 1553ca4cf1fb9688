// CPU flash-attention backward. P is recomputed from the saved lse, tile by tile.
//
// One task per (batch, kv head, chunk of key blocks): it owns the dK/dV rows of its keys
// (summed over the query heads of its GQA group) and accumulates dQ into its own fp32 partial
// buffer, so no two tasks write the same memory and no atomics are needed. With several chunks
// (only when batch x kv heads is too small to feed the threads) the partial dQ buffers are
// summed in a fixed order afterwards: the result is deterministic for a given thread count.
#include "cpu/attention_tile.h"
#include "cpu/dropout_vec.h"

#include <ATen/Parallel.h>

#include <memory>
#include <vector>

namespace fastattn::cpu {
namespace {

// Tuned at (4,8,512,64) fp32, single thread, on MKL sgemm: 64x128 ~ 128x128 ~ 64x64 > 32x128 >
// 64x256 (causal); 64x128 was best non-causal. On brgemm (gemm.h) every choice among 32/64/128
// x 64/128 gave the same causal forward+backward time within the machine's noise.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

// delta[i] = sum_d dout[i, d] * out[i, d]  (B, H, Sq) fp32.
//
// dS = P * (dP - delta) cancels where attention is one-hot (out_i = v_j, so dP_ij = delta_i
// exactly): the two sums then round alike only if they are summed in the same order. On brgemm
// (gemm.h) each dP_ij is one running FMA over d = 0..D-1, so delta is summed that way too,
// 16 rows per vector lane-wise; this cut the dK error of a one-key case (97 queries, D = 128)
// from 9.9e-6 to ~1.5e-6. MKL's sgemm sums in blocks, which the vectorised reduction matches
// better (3.5e-6 there against 8e-6 for the running sum).
template <typename T>
void compute_delta(const AttentionParams& p, const AttentionGrads& g, float* delta) {
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(g.dout);
  const bool running_sum = gemm_engine() == GemmEngine::brgemm;
  constexpr int64_t L = tile::Vec::size();
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(L * p.D), c(L * p.D), aT(L * p.D), cT(L * p.D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const Sequence seq = sequence(p, b);
      for (int64_t i0 = 0; i0 < seq.Sq; i0 += L) {
        const int64_t n = std::min(L, seq.Sq - i0);
        int64_t lda = 0, ldc = 0;
        const float* o = tile::as_f32(out + b * p.o_sb + h * p.o_sh + (seq.q0 + i0) * p.o_ss,
                                      n, p.D, p.o_ss, a.data(), lda);
        const float* d = tile::as_f32(dout + b * g.do_sb + h * g.do_sh + (seq.q0 + i0) * g.do_ss,
                                      n, p.D, g.do_ss, c.data(), ldc);
        float* dst = delta + bh * p.Sq + i0;
        if (!running_sum) {
          for (int64_t r = 0; r < n; ++r)
            dst[r] = at::vec::map2_reduce_all<float>(
                [](tile::Vec x, tile::Vec y) { return x * y; },
                [](tile::Vec x, tile::Vec y) { return x + y; }, o + r * lda, d + r * ldc, p.D);
          continue;
        }
        // (n, D) -> (D, L): lane r of row e holds element e of query row i0 + r.
        at::vec::transpose_mxn<float>(o, lda, aT.data(), L, static_cast<int>(n),
                                      static_cast<int>(p.D));
        at::vec::transpose_mxn<float>(d, ldc, cT.data(), L, static_cast<int>(n),
                                      static_cast<int>(p.D));
        tile::Vec acc(0.f);
        for (int64_t e = 0; e < p.D; ++e)
          acc = at::vec::fmadd(tile::Vec::loadu(cT.data() + e * L),
                               tile::Vec::loadu(aT.data() + e * L), acc);
        acc.store(dst, n);
      }
    }
  });
}

template <typename T>
void backward_impl(const AttentionParams& p, const AttentionGrads& g) {
  const int64_t D = p.D, group = p.H / p.Hkv;
  const int64_t nqb = (p.Sq + kBlockQ - 1) / kBlockQ, nkb = (p.Sk + kBlockK - 1) / kBlockK;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(g.dout);
  const bool softcap = p.softcap > 0.f;

  std::vector<float> delta(p.B * p.H * p.Sq);
  compute_delta<T>(p, g, delta.data());

  // Split the keys into chunks only when (batch, kv head) pairs cannot keep the threads busy.
  const int64_t pairs = p.B * p.Hkv, threads = at::get_num_threads();
  // The partial dQ buffers are capped at 256 MB (or one dQ), trading parallelism for memory.
  const int64_t dq_numel = p.B * p.H * p.Sq * D;
  const int64_t max_chunks =
      std::max<int64_t>(1, (int64_t{1} << 26) / std::max<int64_t>(dq_numel, 1));
  const int64_t nchunk = std::max<int64_t>(
      1, std::min({nkb, (4 * threads + pairs - 1) / pairs, max_chunks}));
  // fp32 dQ with one chunk accumulates straight into the output (contiguous, caller-made);
  // packed mode always goes through the (B, H, max Sq, D) partials (dq is (total_q, H, D)).
  const bool direct = nchunk == 1 && std::is_same_v<T, float> && !p.cu_q;
  // Uninitialised on purpose: each task zeroes the part it owns, in parallel.
  std::unique_ptr<float[]> dq_part(direct ? nullptr : new float[nchunk * dq_numel]);
  float* dq_acc_base = direct ? static_cast<float*>(g.dq) : dq_part.get();

  // Per-thread scratch: P, dS, tanh tiles, dK/dV accumulators, converted / transposed tiles,
  // and with dropout the dropped P tile.
  const int64_t n_scratch = (p.dropout ? 5 : 4) * kBlockQ * kBlockK + 5 * kBlockK * D +
                            2 * kBlockQ * D;
  tile::parallel_tasks(pairs * nchunk, 1, [&] {
    return [&, scratch = std::unique_ptr<float[]>(new float[n_scratch])](int64_t begin,
                                                                        int64_t end) mutable {
      float* pbuf = scratch.get();              // (BQ, BK) probabilities
      float* dsbuf = pbuf + kBlockQ * kBlockK;  // (BQ, BK) dP, then dS
      float* tbuf = dsbuf + kBlockQ * kBlockK;  // (BQ, BK) tanh for softcap
      float* dk_acc = tbuf + kBlockQ * kBlockK; // (BK, D)
      float* dv_acc = dk_acc + kBlockK * D;     // (BK, D)
      float* qs = dv_acc + kBlockK * D;         // conversion scratch
      float* dos = qs + kBlockQ * D;
      float* ks = dos + kBlockQ * D;
      float* kT = ks + kBlockK * D;             // (D, BK) K^T and V^T: as plain row-major
      float* vT = kT + kBlockK * D;             // operands for gemm_nn
      float* xT = vT + kBlockK * D;             // gemm_tn's transpose scratch
      float* pdbuf = xT + kBlockQ * kBlockK;    // (BQ, BK) P * keep / (1 - p) (dropout only)

      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task % nchunk, pair = task / nchunk;
        const int64_t b = pair / p.Hkv, hk = pair % p.Hkv;
        const Sequence seq = sequence(p, b);  // packed mode: this sequence's rows and lengths
        const int64_t kb_begin = c * nkb / nchunk, kb_end = (c + 1) * nkb / nchunk;
        float* dq_acc = dq_acc_base + c * dq_numel;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
          std::fill_n(dq_acc + (b * p.H + h) * p.Sq * D, seq.Sq * D, 0.f);

        for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
          const int64_t j0 = kb * kBlockK, nk = std::min(kBlockK, seq.Sk - j0);
          if (nk <= 0) break;                 // key block past a shorter sequence's end
          const int64_t krow = seq.k0 + j0;
          int64_t ldk = 0;
          const float* kt = tile::as_f32(k + b * p.k_sb + hk * p.k_sh + krow * p.k_ss, nk, D,
                                         p.k_ss, ks, ldk);
          tile::transpose_f32(k + b * p.k_sb + hk * p.k_sh + krow * p.k_ss, nk, D, p.k_ss, kT,
                              kBlockK);
          tile::transpose_f32(v + b * p.v_sb + hk * p.v_sh + krow * p.v_ss, nk, D, p.v_ss, vT,
                              kBlockK);
          std::fill_n(dk_acc, nk * D, 0.f);
          std::fill_n(dv_acc, nk * D, 0.f);

          for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            const float* lse = p.lse + lse_index(p, b, h, 0);
            const float* dlt = delta.data() + (b * p.H + h) * p.Sq;
            for (int64_t qb = 0; qb < nqb; ++qb) {
              const int64_t i0 = qb * kBlockQ, nq = std::min(kBlockQ, seq.Sq - i0);
              if (nq <= 0) break;
              // Skip query blocks that see none of these keys.
              if (tile::visible_keys(p, b, i0).lo >= j0 + nk ||
                  tile::visible_keys(p, b, i0 + nq - 1).hi <= j0)
                continue;
              int64_t ldq = 0, ldo = 0;
              const int64_t qrow = seq.q0 + i0;
              const float* qt = tile::as_f32(q + b * p.q_sb + h * p.q_sh + qrow * p.q_ss, nq, D,
                                             p.q_ss, qs, ldq);
              const float* dot = tile::as_f32(dout + b * g.do_sb + h * g.do_sh + qrow * g.do_ss,
                                              nq, D, g.do_ss, dos, ldo);
              // P = exp(finish(Q K^T) - lse); finish_scores applies the scale
              gemm_nn(nq, nk, D, qt, ldq, kT, kBlockK, pbuf, kBlockK, false);
              for (int64_t r = 0; r < nq; ++r) {
                float* s = pbuf + r * kBlockK;
                const float l = lse[i0 + r];
                const tile::Row row =
                    tile::finish_scores(p, b, h, i0 + r, j0, nk, s, tbuf + r * kBlockK);
                tile::probs(s, nk, row, l);
                if (p.dropout) {  // the forward's mask, regenerated from the same counters
                  float* pd = pdbuf + r * kBlockK;
                  std::fill(pd, pd + row.a, 0.f);
                  std::fill(pd + row.e, pd + nk, 0.f);
                  dropout::apply_row(
                      p.dropout_key,
                      static_cast<uint64_t>(((b * p.H + h) * p.Sq + i0 + r) * p.Sk + j0), s,
                      p.dropout_scale, pd, row.a, row.e);
                }
              }
              // dV += P_drop^T dO  (P_drop = P without dropout)
              const float* pv = p.dropout ? pdbuf : pbuf;
              gemm_tn(nk, D, nq, pv, kBlockK, dot, ldo, dv_acc, D, true, xT);
              // dP = dO V^T, then dS = P * (dP - delta), the gradient of the finished score.
              // With dropout dP is the gradient of P_drop times keep / (1 - p), so
              // dS = P_drop * dP_drop - P * delta.
              gemm_nn(nq, nk, D, dot, ldo, vT, kBlockK, dsbuf, kBlockK, false);
              for (int64_t r = 0; r < nq; ++r) {
                float* ds = dsbuf + r * kBlockK;
                const float* pr = pbuf + r * kBlockK;
                const tile::Vec dl(dlt[i0 + r]);
                if (p.dropout) {
                  at::vec::map3([dl](tile::Vec pd, tile::Vec dp, tile::Vec pp) {
                    return pd * dp - pp * dl;
                  }, ds, pdbuf + r * kBlockK, ds, pr, nk);
                } else {
                  at::vec::map2([dl](tile::Vec pp, tile::Vec dp) { return pp * (dp - dl); },
                                ds, pr, ds, nk);
                }
                if (g.dmask) {
                  float* dm = g.dmask + ((b * p.H + h) * p.Sq + i0 + r) * p.Sk + j0;
                  std::copy_n(ds, nk, dm);
                }
                if (softcap) {  // d(cap * tanh(x / cap)) / dx = 1 - tanh^2
                  const float* t = tbuf + r * kBlockK;
                  at::vec::map2([](tile::Vec d, tile::Vec tt) {
                    return d * (tile::Vec(1.f) - tt * tt);
                  }, ds, ds, t, nk);
                }
                // Times the score scale now, so both GEMMs below are plain products.
                at::vec::map([sc = tile::Vec(p.scale)](tile::Vec x) { return x * sc; }, ds, ds,
                             nk);
              }
              // dK += (scale dS)^T Q ;  dQ += (scale dS) K
              gemm_tn(nk, D, nq, dsbuf, kBlockK, qt, ldq, dk_acc, D, true, xT);
              gemm_nn(nq, D, nk, dsbuf, kBlockK, kt, ldk, dq_acc + ((b * p.H + h) * p.Sq + i0) * D,
                      D, true);
            }
          }
          if (p.cu_q) {  // packed (total_k, Hkv, D): one row per key
            for (int64_t r = 0; r < nk; ++r) {
              const int64_t at = ((krow + r) * p.Hkv + hk) * D;
              tile::store_row(dk_acc + r * D, 1.f, static_cast<T*>(g.dk) + at, D);
              tile::store_row(dv_acc + r * D, 1.f, static_cast<T*>(g.dv) + at, D);
            }
          } else {
            T* dk = static_cast<T*>(g.dk) + ((b * p.Hkv + hk) * p.Sk + j0) * D;
            T* dv = static_cast<T*>(g.dv) + ((b * p.Hkv + hk) * p.Sk + j0) * D;
            tile::store_row(dk_acc, 1.f, dk, nk * D);
            tile::store_row(dv_acc, 1.f, dv, nk * D);
          }
        }
      }
    };
  });

  if (direct) return;
  // dQ = sum of the chunk partials in chunk order, converted to the input dtype.
  T* dq = static_cast<T*>(g.dq);
  const int64_t rows = p.B * p.H * p.Sq;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* dst = dq + row * D;
      if (p.cu_q) {  // packed: partial row (b, h, i) -> dq row (cu_q[b] + i, h)
        const int64_t i = row % p.Sq, bh = row / p.Sq;
        const Sequence seq = sequence(p, bh / p.H);
        if (i >= seq.Sq) continue;
        dst = dq + ((seq.q0 + i) * p.H + bh % p.H) * D;
      }
      float* first = dq_part.get() + row * D;
      for (int64_t c = 1; c < nchunk; ++c) {
        const float* other = dq_part.get() + c * dq_numel + row * D;
        at::vec::map2([](tile::Vec x, tile::Vec y) { return x + y; }, first, first, other, D);
      }
      tile::store_row(first, 1.f, dst, D);
    }
  });
}

}  // namespace

void attention_backward(const AttentionParams& p, const AttentionGrads& g) {
  switch (p.dtype) {
    case DType::kFloat32: backward_impl<float>(p, g); break;
    case DType::kBFloat16: backward_impl<c10::BFloat16>(p, g); break;
    case DType::kFloat16: backward_impl<c10::Half>(p, g); break;
  }
}

}  // namespace fastattn::cpu
