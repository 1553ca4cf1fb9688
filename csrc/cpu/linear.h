// CPU skinny GEMM (csrc/cpu/linear.cpp): y = x @ w^T (+ bias) for inputs with few rows, the
// linear layers of a decode step. Arguments are checked by the torch-facing csrc/linear.cpp.
#pragma once
#include <cstdint>

#include "common/types.h"

namespace fastattn {

struct LinearParams {
  DType dtype = DType::kFloat32;   // of x, w, bias and y
  int64_t m = 0;                   // rows of x and y
  int64_t n = 0;                   // rows of w (output features)
  int64_t k = 0;                   // columns of x and w (input features)
  const void* x = nullptr;         // (m, k), row stride ldx, unit column stride
  int64_t ldx = 0;
  const void* w = nullptr;         // (n, k), row stride ldw, unit column stride
  int64_t ldw = 0;
  const void* bias = nullptr;      // (n,) contiguous, or nullptr
  void* y = nullptr;               // (m, n) contiguous
};

namespace cpu {

void linear_forward(const LinearParams& p);

}  // namespace cpu
}  // namespace fastattn
