// CPU KV-cache attention (decoding): few query rows against a long, possibly paged cache.
//
// Work is split over (batch, block of packed query rows, cache split). Rows are packed as
// h * Sq + i, so the rows of one kv head (its GQA group's query heads x query positions) are
// contiguous: each K/V row is loaded once and used by the whole group (register-blocked 4 rows
// at a time), not once per query head. A row block holds up to 64 rows, i.e. every kv head at
// one-token decode: the cache is then walked position by position, all heads of a position
// together. Those are adjacent in memory ((.., S, Hkv, D) layout), so the cache is read as one
// forward stream per tensor, which the hardware prefetcher follows on its own (software
// prefetch one tile ahead measured 10-25% slower here: benchmarks/cases/kvcache.py shapes,
// 2026-12-03); walking one kv head at a time reads rows Hkv * D elements apart (4 KiB at
// Hkv 8, D 128 fp32), a page per row, and measured several times slower. A long cache is cut into splits (split-K) so one-token decode with few
// batch rows still fills every core; each split keeps an unnormalised (acc, max, sum) and the
// splits are merged with the log-sum-exp rule. fp32 accumulation for every cache dtype.
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
constexpr int64_t kTile = 16;       // cache positions per online-softmax step (tile in L2)
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

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

// s[x * kTile] = q_x . k for NR rows of q (ld Dp) and one key row k (Dp fp32).
template <int NR>
inline void dot_key(const float* q, int64_t Dp, const float* kr, float* s) {
  Vec a[NR];
  for (int x = 0; x < NR; ++x) a[x] = Vec(0.f);
  for (int64_t c = 0; c < Dp; c += kV) {
    const Vec kv = Vec::loadu(kr + c);
    for (int x = 0; x < NR; ++x) a[x] = at::vec::fmadd(Vec::loadu(q + x * Dp + c), kv, a[x]);
  }
  for (int x = 0; x < NR; ++x) s[x * kTile] = hsum(a[x]);
}

// Two key rows at once: s[x * kTile + {0, 1}] = q_x . k{0, 1}. NR x 2 independent FMA chains
// (one key's NR <= 4 chains leave the FMA units waiting on latency) and each q vector is
// loaded once for both keys.
template <int NR>
inline void dot_key_pair(const float* q, int64_t Dp, const float* k0, const float* k1,
                         float* s) {
  Vec a0[NR], a1[NR];
  for (int x = 0; x < NR; ++x) a0[x] = a1[x] = Vec(0.f);
  for (int64_t c = 0; c < Dp; c += kV) {
    const Vec kv0 = Vec::loadu(k0 + c), kv1 = Vec::loadu(k1 + c);
    for (int x = 0; x < NR; ++x) {
      const Vec qv = Vec::loadu(q + x * Dp + c);
      a0[x] = at::vec::fmadd(qv, kv0, a0[x]);
      a1[x] = at::vec::fmadd(qv, kv1, a1[x]);
    }
  }
  for (int x = 0; x < NR; ++x) {
    s[x * kTile] = hsum(a0[x]);
    s[x * kTile + 1] = hsum(a1[x]);
  }
}

// acc_x[0:Dp) += sum_j p[x * kTile + j] v_j for NR rows (acc ld Dp).
template <int NR>
inline void accumulate_rows(const float* p, const float* const* vrows, int64_t nk, float* acc,
                            int64_t Dp) {
  for (int64_t c = 0; c < Dp; c += kV) {
    Vec a[NR];
    for (int x = 0; x < NR; ++x) a[x] = Vec::loadu(acc + x * Dp + c);
    for (int64_t j = 0; j < nk; ++j) {
      const Vec vv = Vec::loadu(vrows[j] + c);
      for (int x = 0; x < NR; ++x) a[x] = at::vec::fmadd(Vec(p[x * kTile + j]), vv, a[x]);
    }
    for (int x = 0; x < NR; ++x) a[x].store(acc + x * Dp + c);
  }
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
  int64_t group, rows, task_rows, row_blocks, splits, Dp;
};

// One task's running state for its rows: unnormalised acc (rows, Dp), running max and sum.
struct Partial {
  float* acc;
  float* m;
  float* l;
};

template <typename T>
void run_task(const KVCacheParams& p, const Plan& plan, int64_t b, int64_t rb, int64_t split,
              float* qf, float* sbuf, float* kbuf, float* vbuf, const float** kptr,
              const float** vptr, const Partial& part) {
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
  auto k_row = [&](const Slot& s, int64_t hk) {
    return kc + s.page * p.k_sp + s.row * p.k_sr + hk * p.k_sh;
  };
  auto v_row = [&](const Slot& s, int64_t hk) {
    return vc + s.page * p.v_sp + s.row * p.v_sr + hk * p.v_sh;
  };
  // Rows [a, e) of the block that belong to kv head hk (block-relative).
  auto rows_of = [&](int64_t hk, int64_t& a, int64_t& e) {
    a = std::max(hk * head_rows, r0) - r0;
    e = std::min((hk + 1) * head_rows, r0 + nr) - r0;
  };

  for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
    const int64_t nk = std::min(kTile, hi - j0);
    // Row pointers (fp32 rows, converted when needed), position-major: the heads of one
    // cache position are adjacent in memory, so the cache is read as one forward stream.
    for (int64_t j = 0; j < nk; ++j) {
      const Slot s = slot_of(p, b, j0 + j);
      for (int64_t hk = hk0; hk < hk1; ++hk) {
        const int64_t slot_ix = (hk - hk0) * kTile + j;
        const T* kr = k_row(s, hk);
        const T* vr = v_row(s, hk);
        if (in_place) {
          kptr[slot_ix] = reinterpret_cast<const float*>(kr);
          vptr[slot_ix] = reinterpret_cast<const float*>(vr);
        } else {
          row_f32(kr, D, Dp, kbuf + slot_ix * Dp);
          row_f32(vr, D, Dp, vbuf + slot_ix * Dp);
          kptr[slot_ix] = kbuf + slot_ix * Dp;
          vptr[slot_ix] = vbuf + slot_ix * Dp;
        }
      }
    }
    // S = Q K^T, two positions at a time, still position-major.
    for (int64_t j = 0; j < nk; j += 2) {
      for (int64_t hk = hk0; hk < hk1; ++hk) {
        const int64_t slot_ix = (hk - hk0) * kTile + j;
        int64_t a, e;
        rows_of(hk, a, e);
        by_row_blocks(e - a, [&](int64_t r, auto nrb) {
          constexpr int NR = decltype(nrb)::value;
          float* srow = sbuf + (a + r) * kTile + j;
          if (j + 1 < nk)
            dot_key_pair<NR>(qf + (a + r) * Dp, Dp, kptr[slot_ix], kptr[slot_ix + 1], srow);
          else
            dot_key<NR>(qf + (a + r) * Dp, Dp, kptr[slot_ix], srow);
        });
      }
    }
    // Online softmax per row; P overwrites S.
    for (int64_t r = 0; r < nr; ++r) {
      float* s = sbuf + r * kTile;
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
      const float* const* vrows = vptr + (hk - hk0) * kTile;
      by_row_blocks(e - a, [&](int64_t r, auto nrb) {
        accumulate_rows<decltype(nrb)::value>(sbuf + (a + r) * kTile, vrows, nk,
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
  const int64_t conv = convert ? max_heads * kTile * Dp : 0;

  // Per-task partial results when split (merged below); unsplit tasks store directly.
  const bool split = plan.splits > 1;
  std::vector<float> parts;
  if (split) parts.resize(n_tasks * kTaskRows * (Dp + 2));

  tile::parallel_tasks(n_tasks, 1, [&] {
    return [&, scratch = std::vector<float>(kTaskRows * Dp * 2 + kTaskRows * kTile +
                                            2 * conv + 2 * kTaskRows),
            ptrs = std::vector<const float*>(2 * max_heads * kTile)](
               int64_t begin, int64_t end) mutable {
      float* qf = scratch.data();                 // (rows, Dp) fp32 q
      float* own_acc = qf + kTaskRows * Dp;       // (rows, Dp) when not split
      float* sbuf = own_acc + kTaskRows * Dp;     // (rows, kTile) scores / probabilities
      float* kbuf = sbuf + kTaskRows * kTile;     // (heads, kTile, Dp) converted K
      float* vbuf = kbuf + conv;                  // (heads, kTile, Dp) converted V
      float* own_ml = vbuf + conv;                // m, l (rows each)
      const float** kptr = ptrs.data();           // (heads, kTile) K / V row pointers
      const float** vptr = kptr + max_heads * kTile;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = t % plan.splits, rbh = t / plan.splits;
        const int64_t rb = rbh % plan.row_blocks, b = rbh / plan.row_blocks;
        Partial part{own_acc, own_ml, own_ml + kTaskRows};
        if (split) {
          float* base = parts.data() + t * kTaskRows * (Dp + 2);
          part = {base, base + kTaskRows * Dp, base + kTaskRows * Dp + kTaskRows};
        }
        run_task<T>(p, plan, b, rb, s, qf, sbuf, kbuf, vbuf, kptr, vptr, part);
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
      auto part_of = [&](int64_t s) { return parts.data() + (gi * plan.splits + s) * kTaskRows * (Dp + 2); };
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
