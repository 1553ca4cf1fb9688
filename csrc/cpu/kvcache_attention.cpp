// CPU KV-cache attention (decoding): few query rows against a long, possibly paged cache.
//
// Work is split over (batch, block of packed query rows, cache split). Rows are packed as
// h * Sq + i, so the rows of one kv head (its GQA group's query heads x query positions) are
// contiguous: each K/V row is loaded once and used by the whole group (register-blocked 4 rows
// at a time), not once per query head. A row block holds up to 64 rows, i.e. every kv head at
// one-token decode: the cache is then walked position by position (8 at a time for Q K^T),
// all heads of a position together. Those are adjacent in memory ((.., S, Hkv, D) layout), so
// the cache is read as one forward stream per tensor, which the hardware prefetcher follows on
// its own (software prefetch one tile ahead measured 10-25% slower here:
// benchmarks/cases/kvcache.py shapes, 2026-12-03; prefetching V during Q K^T gained nothing at
// small shapes either); walking one kv head at a time reads rows Hkv * D elements apart
// (4 KiB at Hkv 8, D 128 fp32), a page per row, and measured several times slower.
// Scores are not one horizontal sum per key and row: 4 keys' accumulators are folded into one
// vector (deinterleave + add, twice), and a fold tree over those gives kV keys' scores in the
// lanes of one vector, which the softmax then reads as a row. A tile holds up to 64 positions
// (16 when a block's heads make wide rows, to keep the tile in L2), so the per-row online
// softmax step is spread over more keys. A long cache is cut into splits (split-K) so one-token
// decode with few batch rows still fills every core; each split keeps an unnormalised
// (acc, max, sum) and the splits are merged with the log-sum-exp rule. fp32 accumulation for
// every cache dtype.
#include "cpu/attention_tile.h"  // must come first: picks the at::vec width

#include "cpu/kvcache_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace fastattn::cpu {
namespace {

using tile::Vec;
using tile::kNegInf;
constexpr int64_t kV = Vec::size();
// Cache positions per online-softmax step: up to kMaxTile, fewer when the tile's K (the heads
// of a row block) would pass kTileFloats fp32 values, so K and V stay in L2 (Plan::tile).
constexpr int64_t kMaxTile = 64;
constexpr int64_t kMinTile = 16;
constexpr int64_t kTileFloats = 16384;
constexpr int64_t kStep = 8;       // positions per score step: two 4-key partials
constexpr int64_t kRowBlock = 4;    // query rows sharing each loaded K/V vector (registers)
constexpr int64_t kTaskRows = 64;   // packed query rows per task
constexpr int64_t kMinSplitKeys = 256;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Keys query row i of batch b may see: [lo, hi) (bottom-right over len keys).
struct Span {
  int64_t lo, hi;
};
inline Span visible(const KVCacheParams& p, int64_t len, int64_t i) {
  const int64_t pos = len - p.Sq + i;
  int64_t lo = 0, hi = len;
  if (p.causal) hi = std::min(hi, pos + 1);
  if (p.window_right >= 0) hi = std::min(hi, pos + p.window_right + 1);
  if (p.window_left >= 0) lo = std::max(lo, pos - p.window_left);
  return {lo, std::max(lo, hi)};
}

inline int64_t batch_len(const KVCacheParams& p, int64_t b) {
  return static_cast<int64_t>(p.cache_seqlens[b]) + p.seqlen_new;
}

// Element offset (without the head) of cache position n of batch b: (page, row in page).
struct Slot {
  int64_t page, row;
};
inline Slot slot_of(const KVCacheParams& p, int64_t b, int64_t n) {
  if (p.block_table) return {p.block_table[b * p.bt_stride + n / p.block_size], n % p.block_size};
  return {p.cache_batch_idx ? static_cast<int64_t>(p.cache_batch_idx[b]) : b, n};
}

// src[0:D) as fp32 in dst[0:Dp), zero past D.
template <typename T>
inline void row_f32(const T* src, int64_t D, int64_t Dp, float* dst) {
  int64_t ld = 0;
  const float* f = tile::as_f32(src, 1, D, D, dst, ld);
  if (f != dst) std::copy_n(f, D, dst);
  std::fill(dst + D, dst + Dp, 0.f);
}

// Pairwise lane sums of a and b side by side: [a0+a1, a2+a3, .., b0+b1, b2+b3, ..]. As a tree
// over per-key accumulators this is a transposing reduction that leaves one key's dot product
// per lane: 15 folds of 3 ops for 16 keys instead of 16 horizontal sums of 8 ops each (the
// horizontal sums cost twice the FMAs at D = 64 and made small-group decode compute bound).
inline Vec fold(Vec a, Vec b) {
  const auto [even, odd] = at::vec::deinterleave2(a, b);
  return even + odd;
}

static_assert(kV % 4 == 0 && (kV & (kV - 1)) == 0, "fold tree needs a power-of-two width >= 4");
constexpr int64_t kParts = kMaxTile / 4;  // 4-key partial vectors per score row

// Partial scores of NR rows of q (ld Dp) against 4G key rows k[0:4G) (Dp fp32): out[x * G + g]
// is keys 4g..4g+3 of row x folded twice, i.e. kV/4 lanes per key in key order. G = 2 for
// one or two rows so that there are >= 8 independent FMA chains.
// The unroll pragmas (here and in accumulate_cols) let GCC keep the accumulator arrays in
// registers; without them it stored every accumulator to the stack on every iteration.
template <int NR, int G>
inline void key_parts(const float* q, int64_t Dp, const float* const* k, Vec* out) {
  constexpr int NK = 4 * G;
  Vec a[NR][NK];
#pragma GCC unroll 4
  for (int x = 0; x < NR; ++x)
#pragma GCC unroll 8
    for (int i = 0; i < NK; ++i) a[x][i] = Vec(0.f);
  for (int64_t c = 0; c < Dp; c += kV) {
    Vec kv[NK];
#pragma GCC unroll 8
    for (int i = 0; i < NK; ++i) kv[i] = Vec::loadu(k[i] + c);
#pragma GCC unroll 4
    for (int x = 0; x < NR; ++x) {
      const Vec qv = Vec::loadu(q + x * Dp + c);
#pragma GCC unroll 8
      for (int i = 0; i < NK; ++i) a[x][i] = at::vec::fmadd(qv, kv[i], a[x][i]);
    }
  }
#pragma GCC unroll 4
  for (int x = 0; x < NR; ++x)
#pragma GCC unroll 2
    for (int g = 0; g < G; ++g)
      out[x * G + g] = fold(fold(a[x][4 * g], a[x][4 * g + 1]), fold(a[x][4 * g + 2], a[x][4 * g + 3]));
}

// The fold tree over N consecutive partial vectors at p (kV floats apart).
template <int N>
inline Vec fold_tree(const float* p) {
  if constexpr (N == 1) {
    return Vec::loadu(p);
  } else {
    return fold(fold_tree<N / 2>(p), fold_tree<N / 2>(p + N / 2 * kV));
  }
}

// acc_x[c:c + NC kV) += sum_j p[x * ldp + j] v_j[c:..) for NR rows (acc ld Dp).
template <int NR, int NC>
inline void accumulate_cols(const float* p, int64_t ldp, const float* const* vrows, int64_t nk,
                            float* acc, int64_t Dp, int64_t c) {
  Vec a[NR][NC];
#pragma GCC unroll 4
  for (int x = 0; x < NR; ++x)
#pragma GCC unroll 4
    for (int n = 0; n < NC; ++n) a[x][n] = Vec::loadu(acc + x * Dp + c + n * kV);
  for (int64_t j = 0; j < nk; ++j) {
    Vec vv[NC];
#pragma GCC unroll 4
    for (int n = 0; n < NC; ++n) vv[n] = Vec::loadu(vrows[j] + c + n * kV);
#pragma GCC unroll 4
    for (int x = 0; x < NR; ++x) {
      const Vec pj(p[x * ldp + j]);
#pragma GCC unroll 4
      for (int n = 0; n < NC; ++n) a[x][n] = at::vec::fmadd(pj, vv[n], a[x][n]);
    }
  }
#pragma GCC unroll 4
  for (int x = 0; x < NR; ++x)
#pragma GCC unroll 4
    for (int n = 0; n < NC; ++n) a[x][n].store(acc + x * Dp + c + n * kV);
}

// acc_x[0:Dp) += sum_j p[x * ldp + j] v_j for NR rows, four vector columns per pass: NR x 4
// independent FMA chains (4 rows x 1 column waited on FMA latency); each probability
// broadcast feeds 4 FMAs and each V load NR.
template <int NR>
inline void accumulate_rows(const float* p, int64_t ldp, const float* const* vrows, int64_t nk,
                            float* acc, int64_t Dp) {
  constexpr int NC = 4;
  int64_t c = 0;
  for (; c + NC * kV <= Dp; c += NC * kV) accumulate_cols<NR, NC>(p, ldp, vrows, nk, acc, Dp, c);
  for (; c < Dp; c += kV) accumulate_cols<NR, 1>(p, ldp, vrows, nk, acc, Dp, c);
}

template <typename F>
inline void by_row_blocks(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) f(r, std::integral_constant<int, 4>{});
  switch (rows - r) {
    case 3: f(r, std::integral_constant<int, 3>{}); break;
    case 2: f(r, std::integral_constant<int, 2>{}); break;
    case 1: f(r, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// Plan shared by the tasks and the merge.
struct Plan {
  int64_t group, rows, task_rows, row_blocks, splits, Dp, tile;
};

// One task's running state for its rows: unnormalised acc (rows, Dp), running max and sum.
struct Partial {
  float* acc;
  float* m;
  float* l;
};

template <typename T>
void run_task(const KVCacheParams& p, const Plan& plan, int64_t b, int64_t rb, int64_t split,
              float* qf, float* sbuf, float* pbuf, float* kbuf, float* vbuf,
              const float** kptr, const float** vptr, const Partial& part) {
  const int64_t Dp = plan.Dp, D = p.D, Sq = p.Sq, head_rows = plan.group * Sq;
  const int64_t r0 = rb * plan.task_rows, nr = std::min(plan.task_rows, plan.rows - r0);
  const int64_t len = batch_len(p, b);
  std::fill(part.acc, part.acc + nr * Dp, 0.f);
  std::fill(part.m, part.m + nr, kNegInf);
  std::fill(part.l, part.l + nr, 0.f);

  // Key range of the rows: lo of the smallest query index, hi of the largest.
  int64_t imin = Sq, imax = -1;
  for (int64_t r = r0; r < r0 + nr; ++r) {
    imin = std::min(imin, r % Sq);
    imax = std::max(imax, r % Sq);
  }
  int64_t lo = visible(p, len, imin).lo, hi = visible(p, len, imax).hi;
  if (hi <= lo) return;
  const int64_t chunk = (hi - lo + plan.splits - 1) / plan.splits;
  lo = lo + split * chunk;
  hi = std::min(hi, lo + chunk);
  if (hi <= lo) return;

  // kv heads [hk0, hk1) own rows [r0, r0 + nr): head hk's rows are
  // [hk * head_rows, (hk + 1) * head_rows) clipped to the block.
  const int64_t hk0 = r0 / head_rows, hk1 = (r0 + nr - 1) / head_rows + 1;
  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.k);
  const T* vc = static_cast<const T*>(p.v);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t h = (r0 + r) / Sq, i = (r0 + r) % Sq;
    row_f32(q + b * p.q_sb + i * p.q_ss + h * p.q_sh, D, Dp, qf + r * Dp);
  }
  Span spans[kTaskRows];
  for (int64_t r = 0; r < nr; ++r) spans[r] = visible(p, len, (r0 + r) % Sq);

  // fp32 rows with a whole number of vectors are read in place, others converted per tile.
  const bool in_place = std::is_same_v<T, float> && D == Dp;
  // Strides in locals: the pointer stores below would otherwise reload them from p.
  const int64_t k_sp = p.k_sp, k_sr = p.k_sr, k_sh = p.k_sh;
  const int64_t v_sp = p.v_sp, v_sr = p.v_sr, v_sh = p.v_sh;
  const bool paged = p.block_table != nullptr;
  const int64_t page0 = paged ? 0 : slot_of(p, b, 0).page;
  // Rows [a, e) of the block that belong to kv head hk (block-relative).
  auto rows_of = [&](int64_t hk, int64_t& a, int64_t& e) {
    a = std::max(hk * head_rows, r0) - r0;
    e = std::min((hk + 1) * head_rows, r0 + nr) - r0;
  };

  const int64_t tile = plan.tile;
  for (int64_t j0 = lo; j0 < hi; j0 += tile) {
    const int64_t nk = std::min(tile, hi - j0);
    // Row pointers (fp32 rows, converted when needed), position-major: the heads of one
    // cache position are adjacent in memory, so the cache is read as one forward stream.
    for (int64_t j = 0; j < nk; ++j) {
      const Slot s = paged ? slot_of(p, b, j0 + j) : Slot{page0, j0 + j};
      const T* kr = kc + s.page * k_sp + s.row * k_sr;
      const T* vr = vc + s.page * v_sp + s.row * v_sr;
      for (int64_t hk = hk0; hk < hk1; ++hk) {
        const int64_t slot_ix = (hk - hk0) * tile + j;
        if (in_place) {
          kptr[slot_ix] = reinterpret_cast<const float*>(kr + hk * k_sh);
          vptr[slot_ix] = reinterpret_cast<const float*>(vr + hk * v_sh);
        } else {
          row_f32(kr + hk * k_sh, D, Dp, kbuf + slot_ix * Dp);
          row_f32(vr + hk * v_sh, D, Dp, vbuf + slot_ix * Dp);
          kptr[slot_ix] = kbuf + slot_ix * Dp;
          vptr[slot_ix] = vbuf + slot_ix * Dp;
        }
      }
    }
    // S = Q K^T, kStep positions at a time, still position-major: 4-key partials (pbuf, per
    // row kParts vectors), then one fold tree per kV keys. Keys past nk (up to a whole vector)
    // repeat the last key; their lanes land in S past nk, which nothing reads.
    const int64_t nk_lanes = round_up(nk, std::max(kV, kStep));
    for (int64_t j = 0; j < nk_lanes; j += kStep) {
      for (int64_t hk = hk0; hk < hk1; ++hk) {
        const float* kj[kStep];
        for (int64_t i = 0; i < kStep; ++i)
          kj[i] = kptr[(hk - hk0) * tile + std::min(j + i, nk - 1)];
        int64_t a, e;
        rows_of(hk, a, e);
        by_row_blocks(e - a, [&](int64_t r, auto nrb) {
          constexpr int NR = decltype(nrb)::value;
          constexpr int G = NR <= 2 ? 2 : 1;
          Vec out[NR * 2];
          for (int64_t h = 0; h < kStep; h += 4 * G) {
            key_parts<NR, G>(qf + (a + r) * Dp, Dp, kj + h, out);
            for (int x = 0; x < NR; ++x)
              for (int g = 0; g < G; ++g)
                out[x * G + g].store(pbuf + ((a + r + x) * kParts + (j + h) / 4 + g) * kV);
          }
        });
      }
    }
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t j = 0; j < nk; j += kV)
        fold_tree<kV / 4>(pbuf + (r * kParts + j / 4) * kV).store(sbuf + r * kMaxTile + j);
    // Online softmax per row; P overwrites S.
    for (int64_t r = 0; r < nr; ++r) {
      float* s = sbuf + r * kMaxTile;
      const int64_t a = std::clamp<int64_t>(spans[r].lo - j0, 0, nk);
      const int64_t e = std::clamp<int64_t>(spans[r].hi - j0, a, nk);
      tile::Row row{kNegInf, a, e};
      if (a < e) {
        if (p.softcap > 0.f) {
          const float inv = p.scale / p.softcap;
          for (int64_t j = a; j < e; ++j) s[j] = p.softcap * std::tanh(s[j] * inv);
        } else if (p.scale > 0.f && !p.alibi) {
          row.mul = p.scale;  // probs() applies it inside its exp
        } else {
          for (int64_t j = a; j < e; ++j) s[j] *= p.scale;
        }
        if (p.alibi) {  // packed row h * Sq + i sits at diagonal position len - Sq + i
          const int64_t h = (r0 + r) / Sq, i = (r0 + r) % Sq;
          tile::add_alibi_row(s, p.alibi[b * p.H + h], len - Sq + i - j0, a, e);
        }
        row.max = row.mul * tile::row_max(s + a, e - a);
      }
      const float m_new = std::max(part.m[r], row.max);
      const float sum = tile::probs(s, nk, row, m_new);  // zero outside [a, e)
      if (m_new == kNegInf) continue;
      if (part.m[r] != m_new && part.l[r] > 0.f) {
        const float corr = std::exp(part.m[r] - m_new);
        part.l[r] *= corr;
        float* o = part.acc + r * Dp;
        at::vec::map([corr](Vec x) { return x * Vec(corr); }, o, o, Dp);
      }
      part.l[r] += sum;
      part.m[r] = m_new;
    }
    // acc += P V per kv head (the tile's V rows are in cache by now).
    for (int64_t hk = hk0; hk < hk1; ++hk) {
      int64_t a, e;
      rows_of(hk, a, e);
      const float* const* vrows = vptr + (hk - hk0) * tile;
      by_row_blocks(e - a, [&](int64_t r, auto nrb) {
        accumulate_rows<decltype(nrb)::value>(sbuf + (a + r) * kMaxTile, kMaxTile, vrows, nk,
                                              part.acc + (a + r) * Dp, Dp);
      });
    }
  }
}

// out / lse of packed row r = h * Sq + i of batch b from merged (acc, m, l).
template <typename T>
inline void store_result(const KVCacheParams& p, int64_t b, int64_t r, const float* acc,
                         float m, float l) {
  const int64_t h = r / p.Sq, i = r % p.Sq;
  const bool empty = !(l > 0.f);
  T* out = static_cast<T*>(p.out) + b * p.o_sb + i * p.o_ss + h * p.o_sh;
  tile::store_row(acc, empty ? 0.f : 1.f / l, out, p.D);
  p.lse[(b * p.H + h) * p.Sq + i] = empty ? kNegInf : m + std::log(l);
}

template <typename T>
void forward_impl(const KVCacheParams& p) {
  Plan plan;
  plan.group = p.H / p.Hkv;
  plan.rows = p.H * p.Sq;  // packed rows h * Sq + i: a kv head's group is contiguous
  // Tasks of kTaskRows rows; when that leaves fewer tasks than threads (one-token decode of
  // one sequence: H rows), blocks of whole kv heads instead, so each thread reads other heads'
  // cache rows (no key is read twice).
  const int64_t threads = at::get_num_threads(), head_rows = plan.group * p.Sq;
  plan.task_rows = kTaskRows;
  if (p.B * ((plan.rows + kTaskRows - 1) / kTaskRows) < threads && head_rows <= kTaskRows) {
    const int64_t tasks_per_batch = (threads + p.B - 1) / p.B;
    const int64_t heads_per_task = std::max<int64_t>(1, (p.Hkv + tasks_per_batch - 1) / tasks_per_batch);
    plan.task_rows = std::min(kTaskRows, heads_per_task * head_rows);
  }
  plan.row_blocks = (plan.rows + plan.task_rows - 1) / plan.task_rows;
  plan.Dp = round_up(p.D, kV);
  // Split the cache so that there are >= 4 tasks per thread, each of >= kMinSplitKeys keys.
  int64_t max_len = 0;
  for (int64_t b = 0; b < p.B; ++b) max_len = std::max(max_len, batch_len(p, b));
  const int64_t base_tasks = p.B * plan.row_blocks;
  const int64_t want = (4 * at::get_num_threads() + base_tasks - 1) / base_tasks;
  plan.splits = std::max<int64_t>(1, std::min(want, max_len / kMinSplitKeys));
  const int64_t n_tasks = base_tasks * plan.splits;
  const int64_t Dp = plan.Dp;
  // kv heads one row block can touch (a head's rows may straddle two blocks)
  const int64_t max_heads = std::min(p.Hkv, kTaskRows) + 1;
  const bool convert = !std::is_same_v<T, float> || p.D != Dp;
  // Fewer positions per tile when a row block's heads make wide cache rows (tile in L2).
  const int64_t block_heads = std::min(p.Hkv, (plan.task_rows + head_rows - 1) / head_rows + 1);
  plan.tile = kMaxTile;
  while (plan.tile > kMinTile && plan.tile * block_heads * Dp > kTileFloats) plan.tile /= 2;
  const int64_t conv = convert ? max_heads * plan.tile * Dp : 0;

  // Per-task partial results when split (merged below); unsplit tasks store directly.
  const bool split = plan.splits > 1;
  // Scratch is left uninitialised (every read is of something written in the same call):
  // zero-filling it cost a few us per call, which is visible at small shapes.
  std::unique_ptr<float[]> parts;
  if (split) parts.reset(new float[n_tasks * kTaskRows * (Dp + 2)]);

  tile::parallel_tasks(n_tasks, 1, [&] {
    return [&, scratch = std::unique_ptr<float[]>(new float[kTaskRows * Dp * 2 + kTaskRows * kMaxTile +
                                                    kTaskRows * kParts * kV + 2 * conv + 2 * kTaskRows]),
            ptrs = std::vector<const float*>(2 * max_heads * plan.tile)](
               int64_t begin, int64_t end) mutable {
      float* qf = scratch.get();                 // (rows, Dp) fp32 q
      float* own_acc = qf + kTaskRows * Dp;       // (rows, Dp) when not split
      float* sbuf = own_acc + kTaskRows * Dp;     // (rows, kMaxTile) scores / probabilities
      float* pbuf = sbuf + kTaskRows * kMaxTile;  // (rows, kParts, kV) partial scores
      float* kbuf = pbuf + kTaskRows * kParts * kV;  // (heads, tile, Dp) converted K
      float* vbuf = kbuf + conv;                  // (heads, tile, Dp) converted V
      float* own_ml = vbuf + conv;                // m, l (rows each)
      const float** kptr = ptrs.data();           // (heads, tile) K / V row pointers
      const float** vptr = kptr + max_heads * plan.tile;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = t % plan.splits, rbh = t / plan.splits;
        const int64_t rb = rbh % plan.row_blocks, b = rbh / plan.row_blocks;
        Partial part{own_acc, own_ml, own_ml + kTaskRows};
        if (split) {
          float* base = parts.get() + t * kTaskRows * (Dp + 2);
          part = {base, base + kTaskRows * Dp, base + kTaskRows * Dp + kTaskRows};
        }
        run_task<T>(p, plan, b, rb, s, qf, sbuf, pbuf, kbuf, vbuf, kptr, vptr, part);
        if (!split) {
          const int64_t r0 = rb * plan.task_rows, nr = std::min(plan.task_rows, plan.rows - r0);
          for (int64_t r = 0; r < nr; ++r)
            store_result<T>(p, b, r0 + r, part.acc + r * Dp, part.m[r], part.l[r]);
        }
      }
    };
  });
  if (!split) return;

  // Merge the splits of each (b, row block): weights exp(m_s - max).
  const int64_t n_groups = base_tasks;
  at::parallel_for(0, n_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(Dp);
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t rb = gi % plan.row_blocks, b = gi / plan.row_blocks;
      const int64_t r0 = rb * plan.task_rows, nr = std::min(plan.task_rows, plan.rows - r0);
      auto part_of = [&](int64_t s) { return parts.get() + (gi * plan.splits + s) * kTaskRows * (Dp + 2); };
      for (int64_t r = 0; r < nr; ++r) {
        float m = kNegInf;
        for (int64_t s = 0; s < plan.splits; ++s)
          m = std::max(m, part_of(s)[kTaskRows * Dp + r]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float l = 0.f;
        if (m != kNegInf) {
          for (int64_t s = 0; s < plan.splits; ++s) {
            const float* base = part_of(s);
            const float ls = base[kTaskRows * Dp + kTaskRows + r];
            if (!(ls > 0.f)) continue;
            const float w = std::exp(base[kTaskRows * Dp + r] - m);
            l += w * ls;
            const float* a = base + r * Dp;
            for (int64_t c = 0; c < Dp; c += kV)
              at::vec::fmadd(Vec(w), Vec::loadu(a + c), Vec::loadu(acc.data() + c))
                  .store(acc.data() + c);
          }
        }
        store_result<T>(p, b, r0 + r, acc.data(), m, l);
      }
    }
  });
}

}  // namespace

void kvcache_attention_forward(const KVCacheParams& p) {
  if (p.B == 0 || p.Sq == 0 || p.H == 0) return;
  switch (p.dtype) {
    case DType::kFloat32: forward_impl<float>(p); break;
    case DType::kBFloat16: forward_impl<c10::BFloat16>(p); break;
    case DType::kFloat16: forward_impl<c10::Half>(p); break;
  }
}

}  // namespace fastattn::cpu
