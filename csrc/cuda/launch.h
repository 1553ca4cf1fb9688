// Entry points of the CUDA kernels (csrc/cuda/*.cu). Torch-free; each returns the launch error.
#pragma once
#include <cuda_runtime_api.h>

#include "common/layer_norm.h"
#include "common/rotary.h"
#include "common/softmax.h"

namespace fastattn::cuda {

namespace softmax {
cudaError_t launch(const SoftmaxParams& p, cudaStream_t stream);
cudaError_t launch(const SoftmaxBackwardParams& p, cudaStream_t stream);
}  // namespace softmax

namespace layer_norm {
cudaError_t launch(const NormParams& p, cudaStream_t stream);
// Rows of the dweight/dbias partial buffers the backward needs (one per block).
int64_t backward_blocks(int64_t rows);
cudaError_t launch(const NormBackwardParams& p, cudaStream_t stream);
}  // namespace layer_norm

namespace rotary {
cudaError_t launch(const RotaryParams& p, cudaStream_t stream);
}  // namespace rotary

// "nvcc MAJOR.MINOR" of the compiler that built the kernels.
const char* nvcc_version();

}  // namespace fastattn::cuda
