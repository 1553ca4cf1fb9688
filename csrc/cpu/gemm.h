// Row-major fp32 GEMM C (+)= A B for the CPU attention tiles, on the fastest engine that works.
//
// oneDNN's brgemm micro-kernels (reached through ATen's cpublas::brgemm) read B in place; MKL's
// sgemm copies (packs) both operands on every call, which at attention's tile sizes
// (64 x 512 x 64) is ~17% of the forward. brgemm is JIT-compiled per shape and not built into
// every torch, so it is probed once (a small product checked against a plain loop) and MKL's
// sgemm is the fallback. FASTATTN_CPU_GEMM=mkl forces the fallback (its tests use this).
#pragma once

#include <cstdint>

namespace fastattn::cpu {

enum class GemmEngine { brgemm, mkl };

// The engine gemm_nn uses in this process (decided on first call, then fixed).
GemmEngine gemm_engine();
const char* gemm_engine_name(GemmEngine e);

// C(M, N) = A(M, K) B(K, N), or C += A B with accumulate; all row-major fp32 with leading
// dims lda, ldb, ldc (>= the row lengths). M, N or K may be 0.
void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate);

// C(M, N) (+)= A^T B with A stored (K, M) row-major (lda >= M). brgemm has no transposed-A
// form, so A is transposed into `scratch` (M * K floats) first; MKL reads it in place.
void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate, float* scratch);

}  // namespace fastattn::cpu
