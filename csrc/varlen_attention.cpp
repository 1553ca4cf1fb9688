// Torch-facing packed variable-length attention ops of fastattn._C (fastattn.varlen_attention):
// argument checks, allocation, registration. The kernels are the attention kernels of
// csrc/cpu/attention_*.cpp in their packed mode (AttentionParams::cu_q / cu_k): one
// at::parallel_for over (sequence, head, block) for all sequences. Every cu_seqlens entry is
// checked here, so no offset the kernels compute can leave the tensors.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "cpu/attention.h"
#include "cpu/tensor_args.h"

namespace fastattn {
namespace {

using cpu::AttentionGrads;
using cpu::AttentionParams;

constexpr const char* kFn = "varlen_attention (cpu)";

// Returns q's dtype.
DType check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const DType dtype = check_qkv_cpu(q, k, v, 3, kFn, "(total, heads, D)");
  TORCH_CHECK(k.size(1) >= 1 && v.size(1) == k.size(1) && q.size(1) % k.size(1) == 0, kFn,
              ": k/v head count must be equal and divide q's head count ", q.size(1),
              ", got k ", k.size(1), " and v ", v.size(1));
  TORCH_CHECK(v.size(0) == k.size(0), kFn, ": v must have k's token count ", k.size(0),
              ", got ", v.size(0));
  TORCH_CHECK(q.size(2) >= 1 && k.size(2) == q.size(2) && v.size(2) == q.size(2), kFn,
              ": q, k and v must have the same head dim >= 1, got ", q.size(2), ", ", k.size(2),
              " and ", v.size(2));
  return dtype;
}

// cu (B+1,) int32 CPU: starts at 0, non-decreasing, ends at `total`, lengths <= max_len.
void check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t batch_plus_1,
                      int64_t total, int64_t max_len, const char* max_name) {
  TORCH_CHECK(batch_plus_1 >= 1, kFn, ": ", name, " must have B + 1 >= 1 entries");
  check_index_tensor(cu, kFn, name, at::kInt, 1, batch_plus_1, "B + 1");
  TORCH_CHECK(cu.is_contiguous(), kFn, ": ", name, " must be contiguous, got strides ",
              cu.strides());
  TORCH_CHECK(max_len >= 0, kFn, ": ", max_name, " must be >= 0, got ", max_len);
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK(c[0] == 0, kFn, ": ", name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b + 1 < batch_plus_1; ++b) {
    const int64_t len = int64_t{c[b + 1]} - c[b];
    TORCH_CHECK(len >= 0, kFn, ": ", name, " must be non-decreasing, but ", name, "[", b + 1,
                "] = ", c[b + 1], " < ", name, "[", b, "] = ", c[b]);
    TORCH_CHECK(len <= max_len, kFn, ": ", max_name, " = ", max_len,
                " is smaller than sequence ", b, "'s length ", len);
  }
  TORCH_CHECK(c[batch_plus_1 - 1] == total, kFn, ": ", name, "'s last entry ",
              c[batch_plus_1 - 1], " must equal the token count ", total);
}

// Fills everything but the outputs; keeps the contiguous inputs alive in `keep`.
AttentionParams make_params(const at::Tensor& q_in, const at::Tensor& k_in,
                            const at::Tensor& v_in, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale,
                            bool causal, int64_t window_left, int64_t window_right,
                            double softcap, double dropout_p, int64_t seed, int64_t offset,
                            std::vector<at::Tensor>& keep) {
  const DType dtype = check_qkv(q_in, k_in, v_in);
  TORCH_CHECK(softcap >= 0, kFn, ": softcap must be >= 0 (0 = off), got ", softcap);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, kFn,
              ": window_left/window_right must be >= 0 or -1 (off), got ", window_left, " and ",
              window_right);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kFn, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  check_cu_seqlens(cu_q, "cu_seqlens_q", cu_q.size(0), q_in.size(0), max_q, "max_seqlen_q");
  check_cu_seqlens(cu_k, "cu_seqlens_k", cu_q.size(0), k_in.size(0), max_k, "max_seqlen_k");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  keep.insert(keep.end(), {q, k, v, cu_q, cu_k});

  AttentionParams p;
  p.dtype = dtype;
  p.B = cu_q.size(0) - 1; p.H = q.size(1); p.Hkv = k.size(1); p.D = q.size(2);
  p.Sq = max_q; p.Sk = max_k; p.total_q = q.size(0);
  p.cu_q = cu_q.data_ptr<int32_t>();
  p.cu_k = cu_k.data_ptr<int32_t>();
  p.q = q.data_ptr(); p.q_sb = 0; p.q_sh = q.stride(1); p.q_ss = q.stride(0);
  p.k = k.data_ptr(); p.k_sb = 0; p.k_sh = k.stride(1); p.k_ss = k.stride(0);
  p.v = v.data_ptr(); p.v_sb = 0; p.v_sh = v.stride(1); p.v_ss = v.stride(0);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.causal = causal;
  p.window_left = window_left;
  p.window_right = window_right;
  p.dropout = dropout_p > 0.0;
  p.dropout_key = dropout_key(seed, offset, dropout_p);
  p.dropout_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  return p;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, double dropout_p, int64_t seed,
    int64_t offset, const std::optional<at::Tensor>& alibi_slopes) {
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal,
                                  window_left, window_right, softcap, dropout_p, seed, offset,
                                  keep);
  p.alibi = alibi_slopes_ptr(alibi_slopes, p.B, p.H, q, kFn);
  at::Tensor out = at::empty({p.total_q, p.H, p.D}, q.options());
  at::Tensor lse = at::empty({p.H, p.total_q}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.o_sb = 0; p.o_sh = out.stride(1); p.o_ss = out.stride(0);
  p.lse = lse.data_ptr<float>();
  if (out.numel() > 0) cpu::attention_forward(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_q,
    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, double dropout_p, int64_t seed,
    int64_t offset, const std::optional<at::Tensor>& alibi_slopes) {
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal,
                                  window_left, window_right, softcap, dropout_p, seed, offset,
                                  keep);
  p.alibi = alibi_slopes_ptr(alibi_slopes, p.B, p.H, q, kFn);
  check_cpu_tensor(dout_in, kFn, "dout", q.scalar_type(), q.sizes(), "of q's shape");
  check_cpu_tensor(out_in, kFn, "out", q.scalar_type(), q.sizes(), "of q's shape");
  check_cpu_tensor(lse_in, kFn, "lse", at::kFloat, {p.H, p.total_q}, "(H, total_q)");
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  if (p.total_q == 0 || p.H == 0 || k.size(0) == 0) {  // nothing attends: all gradients 0
    return {at::zeros_like(q, at::MemoryFormat::Contiguous),
            at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  }
  p.out = const_cast<void*>(out.data_ptr());
  p.o_sb = 0; p.o_sh = out.stride(1); p.o_ss = out.stride(0);
  p.lse = const_cast<float*>(lse.data_ptr<float>());

  // Every row of dq/dk/dv belongs to a sequence, and the kernel writes every row of each
  // sequence (zeros for rows that see nothing), so empty tensors suffice.
  at::Tensor dq = at::empty({p.total_q, p.H, p.D}, q.options());
  at::Tensor dk = at::empty({k.size(0), p.Hkv, p.D}, q.options());
  at::Tensor dv = at::empty({k.size(0), p.Hkv, p.D}, q.options());
  AttentionGrads g;
  g.dout = dout.data_ptr();
  g.do_sb = 0; g.do_sh = dout.stride(1); g.do_ss = dout.stride(0);
  g.dq = dq.data_ptr(); g.dk = dk.data_ptr(); g.dv = dv.data_ptr();
  cpu::attention_backward(p, g);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  // q (total_q, H, D), k/v (total_k, Hkv, D), cu_seqlens_* int32 (B+1,): packed sequences,
  // bottom-right causal/window per sequence. lse is (H, total_q) fp32.
  m.def("varlen_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, bool causal, "
        "int window_left, int window_right, float softcap, float dropout_p, int seed, "
        "int offset, Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def("varlen_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, float scale, bool causal, int window_left, int window_right, "
        "float softcap, float dropout_p, int seed, int offset, Tensor? alibi_slopes=None) "
        "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(fastattn_kernels, CPU, m) {
  m.impl("varlen_attention_forward", &varlen_attention_forward_cpu);
  m.impl("varlen_attention_backward", &varlen_attention_backward_cpu);
}

}  // namespace fastattn
