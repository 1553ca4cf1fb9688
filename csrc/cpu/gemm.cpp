// Engine choice and the two implementations behind gemm_nn (see gemm.h).
#include "cpu/cpu_capability.h"  // first: picks the at::vec width

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu/gemm.h"

#include <ATen/native/CPUBlas.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

// Fortran BLAS (LP64), provided by the MKL inside libtorch_cpu.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

// fp32 x fp32 -> fp32 cpublas::brgemm appeared in torch 2.6 (later releases also define
// CPUBLAS_BRGEMM_F32F32F32); with older headers only the MKL path is compiled.
#if defined(CPUBLAS_BRGEMM_F32F32F32) || TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
#define FASTATTN_HAS_FP32_BRGEMM 1
#else
#define FASTATTN_HAS_FP32_BRGEMM 0
#endif

namespace fastattn::cpu {
namespace {

// Row-major C (+)= op(A) B, op(A) = A (M, K) or, with a_transposed, A stored (K, M) taken
// transposed. BLAS is column-major: it computes C^T = B^T op(A)^T, so B is its first operand.
void mkl(bool a_transposed, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
         const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  // BLAS wants ld >= the rows of each stored (column-major) matrix, even when a dim is 1.
  const int la = static_cast<int>(std::max<int64_t>(ldb, N));
  const int64_t a_rows = a_transposed ? M : std::max<int64_t>(K, 1);
  const int lb = static_cast<int>(std::max<int64_t>(lda, a_rows));
  const int lc = static_cast<int>(std::max<int64_t>(ldc, N));
  const float one = 1.f, beta = accumulate ? 1.f : 0.f;
  sgemm_("N", a_transposed ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}

void brgemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
               int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if FASTATTN_HAS_FP32_BRGEMM
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
#else
  TORCH_CHECK(false, "fastattn: this torch has no fp32 cpublas::brgemm");  // never chosen
#endif
}

// True when brgemm runs here and agrees with a plain loop on an awkward small product
// (odd sizes, leading dims larger than the rows, both store and accumulate).
bool brgemm_works() {
  if (!FASTATTN_HAS_FP32_BRGEMM) return false;
  constexpr int64_t M = 5, N = 19, K = 7, lda = 9, ldb = 23, ldc = 21;
  std::vector<float> a(M * lda), b(K * ldb), c(M * ldc, 0.f), want(M * ldc, 0.f);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i % 7) - 3.f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i % 5) * 0.5f - 1.f;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += a[i * lda + k] * b[k * ldb + j];
      want[i * ldc + j] = s;
    }
  try {
    brgemm_nn(M, N, K, a.data(), lda, b.data(), ldb, c.data(), ldc, false);
    brgemm_nn(M, N, K, a.data(), lda, b.data(), ldb, c.data(), ldc, true);
  } catch (...) {  // not built with oneDNN ukernels, or no kernel for this CPU
    return false;
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      if (std::abs(c[i * ldc + j] - 2.f * want[i * ldc + j]) > 1e-4f) return false;
  return true;
}

GemmEngine choose_engine() {
  const char* env = std::getenv("FASTATTN_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "mkl") == 0) return GemmEngine::mkl;
  return brgemm_works() ? GemmEngine::brgemm : GemmEngine::mkl;
}

}  // namespace

GemmEngine gemm_engine() {
  static const GemmEngine engine = choose_engine();  // thread-safe one-time init
  return engine;
}

const char* gemm_engine_name(GemmEngine e) {
  return e == GemmEngine::brgemm ? "onednn-brgemm" : "mkl-sgemm";
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill_n(C + i * ldc, N, 0.f);
    return;
  }
  if (gemm_engine() == GemmEngine::brgemm) {
    brgemm_nn(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  } else {
    mkl(false, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate, float* scratch) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return gemm_nn(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  if (gemm_engine() == GemmEngine::brgemm) {
    at::vec::transpose_mxn<float>(A, lda, scratch, K, static_cast<int>(K), static_cast<int>(M));
    brgemm_nn(M, N, K, scratch, K, B, ldb, C, ldc, accumulate);
  } else {
    mkl(true, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

}  // namespace fastattn::cpu
