// fastattn::layer_norm_* / rms_norm_* forward and backward: checks, allocation, CPU and CUDA
// registration. One implementation serves both norms (`rms` switches mean and bias off).
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cpu/tensor_args.h"
#if FASTATTN_WITH_CUDA
#include "cuda/launch.h"
#endif

namespace fastattn {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// (N,) parameter as contiguous fp32 (an undefined tensor when absent).
at::Tensor param_f32(const OptTensor& t, const at::Tensor& x, const char* fn, const char* name) {
  if (!given(t)) return {};
  check_device(*t, x, fn, name, "x");
  check_shape(*t, {x.size(1)}, fn, name);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), fn, ": ", name,
              " must be floating point, got ", t->scalar_type());
  return t->to(at::kFloat).contiguous();
}

// Rows of a 2-D tensor with a contiguous last dim (copied otherwise).
at::Tensor rows_2d(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward(
    const char* fn, bool rms, const at::Tensor& x_in, const OptTensor& weight,
    const OptTensor& bias, double eps, const OptTensor& residual_in) {
  NormParams p;
  p.rms = rms;
  p.dtype = dtype_of(x_in, fn, "x");
  TORCH_CHECK(x_in.dim() == 2, fn, ": x must be 2-D (rows, hidden), got shape ", x_in.sizes());
  at::Tensor x = rows_2d(x_in);
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor w = param_f32(weight, x, fn, "weight");
  at::Tensor b = rms ? at::Tensor() : param_f32(bias, x, fn, "bias");
  at::Tensor residual, h;
  if (given(residual_in)) {
    residual = rows_2d(*residual_in);
    check_device(residual, x, fn, "residual", "x");
    check_dtype(residual, x, fn, "residual", "x");
    check_shape(residual, x.sizes(), fn, "residual");
    h = at::empty({rows, cols}, x.options());
  } else {
    h = at::empty({0}, x.options());
  }
  at::Tensor y = at::empty({rows, cols}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({rms ? 0 : rows}, f32), rstd = at::empty({rows}, f32);
  if (x.numel() == 0) {
    if (cols == 0) rstd.fill_(1.f / std::sqrt(eps));  // hidden 0: nothing to normalise
    if (cols == 0 && !rms) mean.zero_();
    return {y, mean, rstd, h};
  }
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  if (residual.defined()) {
    p.residual = residual.data_ptr();
    p.res_stride = residual.stride(0);
    p.h = h.data_ptr();
  }
  p.weight = opt_f32_ptr(w);
  p.bias = opt_f32_ptr(b);
  p.y = y.data_ptr();
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.cols = cols;
  p.eps = static_cast<float>(eps);
  run_on_device(
      x, fn, [&] { cpu::norm_forward(p); },
      [&](auto stream) {
#if FASTATTN_WITH_CUDA
        return cuda::layer_norm::launch(p, stream);
#endif
      });
  return {y, mean, rstd, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(
    const char* fn, bool rms, const at::Tensor& dy_in, const at::Tensor& h_in,
    const OptTensor& weight, bool has_bias, const OptTensor& mean_in, const at::Tensor& rstd_in,
    const OptTensor& dh_extra_in) {
  NormBackwardParams p;
  p.rms = rms;
  p.dtype = dtype_of(h_in, fn, "h");
  TORCH_CHECK(h_in.dim() == 2, fn, ": h must be 2-D (rows, hidden), got shape ", h_in.sizes());
  check_dtype(dy_in, h_in, fn, "dy", "h");
  check_device(dy_in, h_in, fn, "dy", "h");
  check_shape(dy_in, h_in.sizes(), fn, "dy");
  const int64_t rows = h_in.size(0), cols = h_in.size(1);
  at::Tensor dy = dy_in.contiguous(), h = h_in.contiguous();
  auto stat = [&](const at::Tensor& t, const char* name) {
    check_device(t, h, fn, name, "h");
    check_shape(t, {rows}, fn, name);
    check_scalar_type(t, at::kFloat, fn, name);
    return t.contiguous();
  };
  at::Tensor rstd = stat(rstd_in, "rstd");
  at::Tensor mean;
  if (!rms) {
    TORCH_CHECK(given(mean_in), fn, ": mean is required");
    mean = stat(*mean_in, "mean");
  }
  at::Tensor dh_extra;
  if (given(dh_extra_in)) {
    dh_extra = dh_extra_in->contiguous();
    check_device(dh_extra, h, fn, "dh_extra", "h");
    check_dtype(dh_extra, h, fn, "dh_extra", "h");
    check_shape(dh_extra, h.sizes(), fn, "dh_extra");
  }
  at::Tensor w = param_f32(weight, h, fn, "weight");
  at::Tensor dx = at::empty({rows, cols}, h.options());
  const auto f32 = h.options().dtype(at::kFloat);
  int64_t chunks = 1;
  if (h.is_cpu()) {
    chunks = cpu::norm_backward_chunks(rows);
  } else {
#if FASTATTN_WITH_CUDA
    chunks = cuda::layer_norm::backward_blocks(rows);
#endif
  }
  // fp32 partial sums, one row per chunk of rows, reduced below.
  at::Tensor dw_part = w.defined() ? at::zeros({chunks, cols}, f32) : at::Tensor();
  at::Tensor db_part = has_bias ? at::zeros({chunks, cols}, f32) : at::Tensor();
  if (rows > 0 && cols > 0) {
    p.dy = dy.data_ptr();
    p.h = h.data_ptr();
    p.dh_extra = dh_extra.defined() ? dh_extra.data_ptr() : nullptr;
    p.weight = opt_f32_ptr(w);
    p.mean = rms ? nullptr : mean.data_ptr<float>();
    p.rstd = rstd.data_ptr<float>();
    p.dx = dx.data_ptr();
    p.dweight_partial = dw_part.defined() ? dw_part.data_ptr<float>() : nullptr;
    p.dbias_partial = db_part.defined() ? db_part.data_ptr<float>() : nullptr;
    p.rows = rows;
    p.cols = cols;
    p.partial_rows = chunks;
    run_on_device(
        h, fn, [&] { cpu::norm_backward(p); },
        [&](auto stream) {
#if FASTATTN_WITH_CUDA
          return cuda::layer_norm::launch(p, stream);
#endif
        });
  }
  at::Tensor dweight = at::empty({0}, h.options()), dbias = at::empty({0}, h.options());
  if (w.defined()) dweight = dw_part.sum(0).to(weight->scalar_type());
  if (has_bias) dbias = db_part.sum(0).to(h.scalar_type());
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps,
    const OptTensor& residual) {
  return norm_forward("fastattn.layer_norm_forward", false, x, weight, bias, eps, residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_forward(
    const at::Tensor& x, const OptTensor& weight, double eps, const OptTensor& residual) {
  auto [y, mean, rstd, h] =
      norm_forward("fastattn.rms_norm_forward", true, x, weight, {}, eps, residual);
  return {y, rstd, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& dy, const at::Tensor& h, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& dh_extra) {
  constexpr const char* fn = "fastattn.layer_norm_backward";
  if (given(bias)) {
    check_device(*bias, h, fn, "bias", "h");
    TORCH_CHECK(bias->dim() == 1 && h.dim() == 2 && bias->size(0) == h.size(1), fn,
                ": bias must have shape (hidden,), got ", bias->sizes());
  }
  auto [dx, dw, db] = norm_backward(fn, false, dy, h, weight, given(bias), mean, rstd, dh_extra);
  if (given(bias)) db = db.to(bias->scalar_type());
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& h,
                                                     const OptTensor& weight,
                                                     const at::Tensor& rstd,
                                                     const OptTensor& dh_extra) {
  auto [dx, dw, db] = norm_backward("fastattn.rms_norm_backward", true, dy, h, weight, false,
                                    std::nullopt, rstd, dh_extra);
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual)"
        " -> (Tensor y, Tensor mean, Tensor rstd, Tensor h)");
  m.def("layer_norm_backward(Tensor dy, Tensor h, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor rstd, Tensor? dh_extra) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("rms_norm_forward(Tensor x, Tensor? weight, float eps, Tensor? residual)"
        " -> (Tensor y, Tensor rstd, Tensor h)");
  m.def("rms_norm_backward(Tensor dy, Tensor h, Tensor? weight, Tensor rstd, Tensor? dh_extra)"
        " -> (Tensor dx, Tensor dweight)");
}

TORCH_LIBRARY_IMPL(fastattn_kernels, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward);
  m.impl("layer_norm_backward", &layer_norm_backward);
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

#if FASTATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastattn_kernels, CUDA, m) {
  m.impl("layer_norm_forward", &layer_norm_forward);
  m.impl("layer_norm_backward", &layer_norm_backward);
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}
#endif

}  // namespace fastattn
