// CPU merge of two partial attention results (out, lse) over disjoint key sets.
#include "cpu/vec.h"  // first: selects the SIMD width

#include <ATen/Parallel.h>

#include "common/merge_attention_states.h"

namespace fastattn::cpu {
namespace {

template <typename T>
void merge(const MergeAttentionStatesParams& p) {
  const T* out_a = static_cast<const T*>(p.out_a);
  const T* out_b = static_cast<const T*>(p.out_b);
  T* out = static_cast<T*>(p.out);
  const int64_t cols = p.cols;
  // ~cols * 3 bytes moved per row: grain so that a task moves at least ~64 KiB.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const MergeWeights w = merge_weights(p.lse_a[r], p.lse_b[r]);
      p.lse[r] = w.lse;
      const T* a = out_a + row_offset(p.out_a_rows, r);  // (cols,)
      const T* b = out_b + row_offset(p.out_b_rows, r);  // (cols,)
      T* y = out + r * cols;                             // (cols,)
      const fVec wa(w.w_a), wb(w.w_b);
      for (int64_t j = 0; j < cols; j += kF) {
        const int64_t n = std::min<int64_t>(kF, cols - j);
        // A weight of 0 must not turn an inf/NaN of the other side's output into NaN: a row
        // with no keys has out = 0 by contract, so 0 * out is 0 there.
        store_f(y + j, load_f(a + j, n) * wa + load_f(b + j, n) * wb, n);
      }
    }
  });
}

}  // namespace

void merge_attention_states(const MergeAttentionStatesParams& p) {
  dispatch_dtype(p.dtype, [&](auto t) { merge<decltype(t)>(p); });
}

}  // namespace fastattn::cpu
