// fastattn_kernels::swiglu_forward / swiglu_backward: checks, allocation, CPU registration.
// No CUDA kernel: on CUDA tensors the selector picks the triton backend (kernels/swiglu.py).
#include <torch/library.h>

#include <tuple>

#include "cpu/swiglu.h"
#include "cpu/tensor_args.h"

namespace fastattn {
namespace {

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* fn, const char* name,
                const char* ref_name) {
  check_dtype(t, ref, fn, name, ref_name);
  check_device(t, ref, fn, name, ref_name);
  check_shape(t, ref.sizes(), fn, name);
}

at::Tensor swiglu_forward(const at::Tensor& gate_in, const at::Tensor& up_in) {
  constexpr const char* fn = "fastattn.swiglu_forward";
  SwigluParams p;
  p.dtype = dtype_of(gate_in, fn, "gate");
  check_like(up_in, gate_in, fn, "up", "gate");
  TORCH_CHECK(gate_in.is_cpu(), fn, ": no kernel for device ", gate_in.device());
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  p.n = gate.numel();
  if (p.n == 0) return out;
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.out = out.data_ptr();
  cpu::swiglu_forward(p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dy_in,
                                                   const at::Tensor& gate_in,
                                                   const at::Tensor& up_in) {
  constexpr const char* fn = "fastattn.swiglu_backward";
  SwigluBackwardParams p;
  p.dtype = dtype_of(gate_in, fn, "gate");
  check_like(up_in, gate_in, fn, "up", "gate");
  check_like(dy_in, gate_in, fn, "dy", "gate");
  TORCH_CHECK(gate_in.is_cpu(), fn, ": no kernel for device ", gate_in.device());
  const at::Tensor dy = dy_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  p.n = gate.numel();
  if (p.n == 0) return {dgate, dup};
  p.dy = dy.data_ptr();
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.dgate = dgate.data_ptr();
  p.dup = dup.data_ptr();
  cpu::swiglu_backward(p);
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn_kernels, CPU, m) {
  m.impl("swiglu_forward", &swiglu_forward);
  m.impl("swiglu_backward", &swiglu_backward);
}

}  // namespace fastattn
