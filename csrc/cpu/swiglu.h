// CPU SwiGLU kernels (csrc/cpu/swiglu.cpp): out = silu(gate) * up and its backward, elementwise
// over contiguous tensors. Arguments are checked by the torch-facing csrc/swiglu.cpp.
#pragma once
#include <cstdint>

#include "common/types.h"

namespace fastattn {

struct SwigluParams {
  DType dtype = DType::kFloat32;
  int64_t n = 0;            // elements
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
};

struct SwigluBackwardParams {
  DType dtype = DType::kFloat32;
  int64_t n = 0;
  const void* dy = nullptr;
  const void* gate = nullptr;
  const void* up = nullptr;
  void* dgate = nullptr;
  void* dup = nullptr;
};

namespace cpu {

void swiglu_forward(const SwigluParams& p);
void swiglu_backward(const SwigluBackwardParams& p);

}  // namespace cpu
}  // namespace fastattn
