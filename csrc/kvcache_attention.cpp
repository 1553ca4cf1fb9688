// fastattn::kvcache_attention_forward: argument checks, allocation and CPU registration of the
// KV-cache attention kernel (csrc/cpu/kvcache_attention.cpp). Every index the kernel follows
// (cache_seqlens, block_table, cache_batch_idx) is checked against the cache here, so no input
// can make it read out of bounds. The new keys are appended by the caller (fastattn/ops).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

#include "cpu/kvcache_attention.h"
#include "cpu/tensor_args.h"

namespace fastattn {
namespace {

constexpr const char* kFn = "kvcache_attention (cpu)";

at::Tensor head_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> kvcache_attention_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& seqlens_in, const std::optional<at::Tensor>& block_table_in,
    const std::optional<at::Tensor>& batch_idx_in, int64_t seqlen_new, double scale,
    bool causal, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  cpu::KVCacheParams p;
  p.dtype = check_qkv_cpu(q_in, k_in, v_in, 4, kFn, "(batch, seq, heads, D)", "k_cache",
                          "v_cache");
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), kFn, ": v_cache must have k_cache's shape ",
              k_in.sizes(), ", got ", v_in.sizes());
  const int64_t B = q_in.size(0), Sq = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(2);
  TORCH_CHECK(k_in.size(3) == D && D >= 1, kFn, ": k_cache head dim must equal q's (", D,
              "), got ", k_in.size(3));
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, kFn, ": k_cache kv heads (", Hkv,
              ") must divide q's heads (", H, ")");
  TORCH_CHECK(seqlen_new >= 0, kFn, ": seqlen_new must be >= 0, got ", seqlen_new);
  TORCH_CHECK(softcap >= 0, kFn, ": softcap must be >= 0, got ", softcap);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, kFn,
              ": window_left/window_right must be >= 0 or -1 (off)");

  check_index_tensor(seqlens_in, kFn, "cache_seqlens", at::kInt, 1, B, "q's batch");
  const at::Tensor seqlens = seqlens_in.contiguous();
  const bool paged = block_table_in.has_value() && block_table_in->defined();
  const bool has_idx = batch_idx_in.has_value() && batch_idx_in->defined();
  const int64_t pages = k_in.size(0), block_size = k_in.size(1);
  at::Tensor block_table, batch_idx;
  int64_t capacity = block_size;
  if (paged) {
    TORCH_CHECK(!has_idx, kFn, ": cache_batch_idx cannot be combined with block_table");
    check_index_tensor(*block_table_in, kFn, "block_table", at::kInt, 2, B,
                       "(B, max_blocks), B = q's batch");
    TORCH_CHECK(block_size >= 1, kFn, ": a paged cache needs block_size >= 1");
    block_table = block_table_in->contiguous();
    capacity = block_table.size(1) * block_size;
  } else if (has_idx) {
    check_index_tensor(*batch_idx_in, kFn, "cache_batch_idx", at::kInt, 1, B, "q's batch");
    batch_idx = batch_idx_in->contiguous();
    const int32_t* bi = batch_idx.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(bi[b] >= 0 && bi[b] < pages, kFn, ": cache_batch_idx[", b, "] = ", bi[b],
                  " is outside [0, ", pages, ") (k_cache's batch)");
  } else {
    TORCH_CHECK(pages == B, kFn, ": k_cache has batch ", pages, " but q has ", B);
  }
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] + seqlen_new <= capacity, kFn, ": cache_seqlens[", b,
                "] + Sq_new = ", lens[b], " + ", seqlen_new, " must lie in [0, ", capacity,
                "] (", paged ? "max_blocks * block_size" : "S_max", ")");
    if (paged) {
      const int64_t used = (lens[b] + seqlen_new + block_size - 1) / block_size;
      const int32_t* row = block_table.data_ptr<int32_t>() + b * block_table.size(1);
      for (int64_t j = 0; j < used; ++j)
        TORCH_CHECK(row[j] >= 0 && row[j] < pages, kFn, ": block_table[", b, ", ", j, "] = ",
                    row[j], " is outside [0, num_blocks=", pages, ")");
    }
  }

  const at::Tensor q = head_dim_contiguous(q_in), k = head_dim_contiguous(k_in),
                   v = head_dim_contiguous(v_in);
  at::Tensor out = at::empty({B, Sq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  p.B = B;
  p.Sq = Sq;
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_ss = q.stride(1);
  p.q_sh = q.stride(2);
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_sp = k.stride(0);
  p.k_sr = k.stride(1);
  p.k_sh = k.stride(2);
  p.v_sp = v.stride(0);
  p.v_sr = v.stride(1);
  p.v_sh = v.stride(2);
  p.block_size = block_size;
  p.block_table = paged ? block_table.data_ptr<int32_t>() : nullptr;
  p.bt_stride = paged ? block_table.size(1) : 0;
  p.cache_batch_idx = has_idx ? batch_idx.data_ptr<int32_t>() : nullptr;
  p.cache_seqlens = lens;
  p.seqlen_new = seqlen_new;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.causal = causal;
  p.window_left = window_left;
  p.window_right = window_right;
  p.alibi = alibi_slopes_ptr(alibi_slopes, B, H, q_in, kFn);
  p.out = out.data_ptr();
  p.o_sb = out.stride(0);
  p.o_ss = out.stride(1);
  p.o_sh = out.stride(2);
  p.lse = lse.data_ptr<float>();
  cpu::kvcache_attention_forward(p);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  m.def("kvcache_attention_forward(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens,"
        " Tensor? block_table, Tensor? cache_batch_idx, int seqlen_new, float scale, bool causal,"
        " int window_left, int window_right, float softcap, Tensor? alibi_slopes=None)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_kernels, CPU, m) {
  m.impl("kvcache_attention_forward", &kvcache_attention_forward);
}

}  // namespace fastattn
