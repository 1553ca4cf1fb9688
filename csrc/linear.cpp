// fastattn_kernels::linear_forward: checks, allocation, CPU registration of the skinny GEMM.
// No CUDA kernel: on CUDA tensors the selector picks the torch backend (ATen's cuBLAS GEMM).
#include <torch/library.h>

#include <optional>

#include "cpu/linear.h"
#include "cpu/tensor_args.h"

namespace fastattn {
namespace {

// A view whose last dimension is contiguous (rows may have any stride), copying only if not.
at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

at::Tensor linear_forward(const at::Tensor& x_in, const at::Tensor& w_in,
                          const std::optional<at::Tensor>& bias_in) {
  constexpr const char* fn = "fastattn.linear_forward";
  LinearParams p;
  p.dtype = dtype_of(x_in, fn, "x");
  TORCH_CHECK(x_in.dim() == 2, fn, ": x must be 2-D (rows, in_features), got ", x_in.sizes());
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(1) == x_in.size(1), fn,
              ": weight must have shape (out_features, ", x_in.size(1), "), got ", w_in.sizes());
  check_dtype(w_in, x_in, fn, "weight", "x");
  check_device(w_in, x_in, fn, "weight", "x");
  TORCH_CHECK(x_in.is_cpu(), fn, ": no kernel for device ", x_in.device());
  at::Tensor bias;
  if (bias_in.has_value()) {
    check_dtype(*bias_in, x_in, fn, "bias", "x");
    check_device(*bias_in, x_in, fn, "bias", "x");
    check_shape(*bias_in, {w_in.size(0)}, fn, "bias");
    bias = bias_in->contiguous();
  }
  const at::Tensor x = unit_column_stride(x_in), w = unit_column_stride(w_in);
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  p.m = x.size(0);
  p.n = w.size(0);
  p.k = x.size(1);
  if (p.m == 0 || p.n == 0) return y;
  if (p.k == 0) return bias.defined() ? y.copy_(bias.expand_as(y)) : y.zero_();
  p.x = x.data_ptr();
  p.ldx = x.stride(0);
  p.w = w.data_ptr();
  p.ldw = w.stride(0);
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.y = y.data_ptr();
  cpu::linear_forward(p);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  m.def("linear_forward(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_kernels, CPU, m) {
  m.impl("linear_forward", &linear_forward);
}

}  // namespace fastattn
