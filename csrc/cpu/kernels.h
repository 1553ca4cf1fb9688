// Entry points of the CPU kernels (csrc/cpu/*.cpp). Arguments are already checked by the
// torch-facing csrc/*.cpp.
#pragma once
#include "common/layer_norm.h"
#include "common/rotary.h"
#include "common/softmax.h"

namespace fastattn::cpu {

void softmax_forward(const SoftmaxParams& p);
void softmax_backward(const SoftmaxBackwardParams& p);
void norm_forward(const NormParams& p);
// Number of row chunks (rows of the dweight/dbias partial buffers) norm_backward uses.
int64_t norm_backward_chunks(int64_t rows);
void norm_backward(const NormBackwardParams& p);
void rotary_forward(const RotaryParams& p);

}  // namespace fastattn::cpu
