// The nvcc version that built the CUDA kernels (reported by fastattn.build_info()).
#include "cuda/launch.h"

#define FA_STR2(x) #x
#define FA_STR(x) FA_STR2(x)

namespace fastattn::cuda {

const char* nvcc_version() {
  return "nvcc " FA_STR(__CUDACC_VER_MAJOR__) "." FA_STR(__CUDACC_VER_MINOR__) "." FA_STR(
      __CUDACC_VER_BUILD__);
}

}  // namespace fastattn::cuda
