// fastattn::build_info() -> str: JSON describing how the extension was built.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu/gemm.h"

#if FASTATTN_WITH_CUDA
#include "cuda/launch.h"
#endif

#ifndef FASTATTN_CUDA_ARCHS
#define FASTATTN_CUDA_ARCHS ""
#endif
#ifndef FASTATTN_CPU_ARCH
#define FASTATTN_CPU_ARCH "unknown"
#endif

namespace fastattn {
namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

std::string simd() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "baseline";
#endif
}

std::string build_info() {
  std::string json = "{";
  json += std::string("\"cuda_compiled\": ") + (FASTATTN_WITH_CUDA ? "true" : "false");
  json += std::string(", \"cuda_archs\": \"") + (FASTATTN_WITH_CUDA ? FASTATTN_CUDA_ARCHS : "") + "\"";
  json += ", \"cpu_kernels\": true";
  json += ", \"compiler\": \"" + compiler() + "\"";
#if FASTATTN_WITH_CUDA
  json += std::string(", \"nvcc\": \"") + cuda::nvcc_version() + "\"";
#endif
  json += ", \"cpu_simd\": \"" + simd() + "\"";
  // FASTATTN_CPU_ARCH of setup.py (portable, native or a -march value) and the torch headers
  // compiled against (the C++ ABI must match the torch that loads it).
  json += std::string(", \"cpu_arch\": \"") + FASTATTN_CPU_ARCH + "\"";
  json += std::string(", \"torch_built\": \"") + TORCH_VERSION + "\"";
  // Decided at run time (FASTATTN_CPU_GEMM, and whether oneDNN's brgemm works here).
  json += std::string(", \"cpu_gemm\": \"") + cpu::gemm_engine_name(cpu::gemm_engine()) + "\"";
#if defined(__SANITIZE_ADDRESS__)
  json += ", \"asan\": true";
#else
  json += ", \"asan\": false";
#endif
  json += "}";
  return json;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  // No tensor argument to dispatch on: registered as the catch-all kernel.
  m.def("build_info() -> str", &build_info);
}

}  // namespace fastattn
