// fastattn::softmax_forward / softmax_backward: checks, allocation, CPU and CUDA registration.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cpu/tensor_args.h"
#if FASTATTN_WITH_CUDA
#include "cuda/launch.h"
#endif

namespace fastattn {
namespace {

at::Tensor softmax_forward(const at::Tensor& x_in, double scale,
                           const std::optional<at::Tensor>& mask_in, bool causal) {
  constexpr const char* fn = "fastattn.softmax_forward";
  SoftmaxParams p;
  p.dtype = dtype_of(x_in, fn, "x");
  TORCH_CHECK(x_in.dim() >= 1, fn, ": x must have at least 1 dim, got a scalar");
  at::Tensor x = last_dim_contiguous(x_in);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = *mask_in;
    check_device(mask, x, fn, "mask", "x");
    check_shape(mask, x.sizes(), fn, "mask (expanded to x's shape)");
    if (mask.scalar_type() == at::kBool) {
      p.mask_kind = MaskKind::kBool;
    } else {
      TORCH_CHECK(at::isFloatingType(mask.scalar_type()), fn,
                  ": mask must be bool or floating point, got ", mask.scalar_type());
      p.mask_kind = MaskKind::kFloat;
      if (mask.scalar_type() != x.scalar_type()) mask = mask.to(x.scalar_type());
    }
    mask = last_dim_contiguous(mask);
    p.mask_rows = rows_of(mask);
    p.mask = mask.data_ptr();
  }
  p.x_rows = rows_of(x);
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.cols = x.size(-1);
  p.rows = x.numel() / p.cols;
  p.m = x.dim() >= 2 ? x.size(-2) : 1;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  run_on_device(
      x, fn, [&] { cpu::softmax_forward(p); },
      [&](auto stream) {
#if FASTATTN_WITH_CUDA
        return cuda::softmax::launch(p, stream);
#endif
      });
  return y;
}

at::Tensor softmax_backward(const at::Tensor& dy_in, const at::Tensor& y_in, double scale) {
  constexpr const char* fn = "fastattn.softmax_backward";
  SoftmaxBackwardParams p;
  p.dtype = dtype_of(y_in, fn, "y");
  check_dtype(dy_in, y_in, fn, "dy", "y");
  check_device(dy_in, y_in, fn, "dy", "y");
  check_shape(dy_in, y_in.sizes(), fn, "dy");
  TORCH_CHECK(y_in.dim() >= 1, fn, ": y must have at least 1 dim, got a scalar");
  at::Tensor dy = last_dim_contiguous(dy_in), y = last_dim_contiguous(y_in);
  at::Tensor dx = at::empty(y.sizes(), y.options());
  if (y.numel() == 0) return dx;
  p.dy_rows = rows_of(dy);
  p.y_rows = rows_of(y);
  p.dy = dy.data_ptr();
  p.y = y.data_ptr();
  p.dx = dx.data_ptr();
  p.cols = y.size(-1);
  p.rows = y.numel() / p.cols;
  p.scale = static_cast<float>(scale);
  run_on_device(
      y, fn, [&] { cpu::softmax_backward(p); },
      [&](auto stream) {
#if FASTATTN_WITH_CUDA
        return cuda::softmax::launch(p, stream);
#endif
      });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  m.def("softmax_forward(Tensor x, float scale, Tensor? mask, bool causal) -> Tensor");
  m.def("softmax_backward(Tensor dy, Tensor y, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_kernels, CPU, m) {
  m.impl("softmax_forward", &softmax_forward);
  m.impl("softmax_backward", &softmax_backward);
}

#if FASTATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastattn_kernels, CUDA, m) {
  m.impl("softmax_forward", &softmax_forward);
  m.impl("softmax_backward", &softmax_backward);
}
#endif

}  // namespace fastattn
