// fastattn::merge_attention_states: checks, allocation, CPU registration.
#include <torch/library.h>

#include <tuple>

#include "common/merge_attention_states.h"
#include "cpu/tensor_args.h"

namespace fastattn {
namespace cpu {
void merge_attention_states(const MergeAttentionStatesParams& p);  // cpu/merge_attention_states.cpp
}  // namespace cpu

namespace {

std::tuple<at::Tensor, at::Tensor> merge_attention_states_forward(const at::Tensor& out_a_in,
                                                          const at::Tensor& lse_a_in,
                                                          const at::Tensor& out_b_in,
                                                          const at::Tensor& lse_b_in) {
  constexpr const char* fn = "fastattn.merge_attention_states_forward";
  MergeAttentionStatesParams p;
  p.dtype = dtype_of(out_a_in, fn, "out_a");
  check_dtype(out_b_in, out_a_in, fn, "out_b", "out_a");
  check_device(out_b_in, out_a_in, fn, "out_b", "out_a");
  check_device(lse_a_in, out_a_in, fn, "lse_a", "out_a");
  check_device(lse_b_in, out_a_in, fn, "lse_b", "out_a");
  TORCH_CHECK(out_a_in.dim() >= 1, fn, ": out_a must have at least 1 dim, got a scalar");
  check_shape(out_b_in, out_a_in.sizes(), fn, "out_b");
  const auto lse_shape = out_a_in.sizes().slice(0, out_a_in.dim() - 1);
  check_shape(lse_a_in, lse_shape, fn, "lse_a");
  check_shape(lse_b_in, lse_shape, fn, "lse_b");
  check_scalar_type(lse_a_in, at::kFloat, fn, "lse_a");
  check_scalar_type(lse_b_in, at::kFloat, fn, "lse_b");
  at::Tensor out_a = last_dim_contiguous(out_a_in), out_b = last_dim_contiguous(out_b_in);
  const at::Tensor lse_a = lse_a_in.contiguous(), lse_b = lse_b_in.contiguous();
  at::Tensor out = at::empty(out_a.sizes(), out_a.options());  // contiguous
  at::Tensor lse = at::empty(lse_shape, lse_a.options());
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  p.cols = out_a.size(-1);
  p.rows = lse.numel();
  if (p.cols > 0) {
    p.out_a_rows = rows_of(out_a);
    p.out_b_rows = rows_of(out_b);
  }
  p.out_a = out_a.data_ptr();
  p.out_b = out_b.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  TORCH_CHECK(out_a.is_cpu(), fn, ": no kernel for device ", out_a.device(),
              " (CUDA tensors take the triton backend)");
  cpu::merge_attention_states(p);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  m.def("merge_attention_states_forward(Tensor out_a, Tensor lse_a, Tensor out_b, "
        "Tensor lse_b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_kernels, CPU, m) {
  m.impl("merge_attention_states_forward", &merge_attention_states_forward);
}

}  // namespace fastattn
