// CPU skinny GEMM: y (m, n) = x (m, k) @ w (n, k)^T + bias, for small m (a decode step's
// linear layers: m = batch x new tokens).
//
// With a few rows the GEMM is bound by reading w, which is read once here: the output columns
// are split into blocks of kCols weight rows; a block's rows are streamed once (fp32 FMAs into
// one accumulator per (x row, w row) pair, kRows x rows at a time, so each loaded w vector
// feeds kRows FMAs and each x vector kCols), and the later row groups find the block in L1.
// A BLAS GEMM instead packs w into panels on every call, a second pass over it that costs as
// much as the product at m <= 16; this kernel reads w at ~1.3x MKL's rate on a decode step's
// shapes (python -m benchmarks --ops linear).
// x is re-read for every block, from L1/L2 when m is small; the ops layer sends inputs with
// more rows to ATen's GEMM (compute-bound, where packing pays).
// fp32 accumulation, one rounding to the dtype; threads split the column blocks.
#include "cpu/vec.h"  // first: selects the SIMD width

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/linear.h"

namespace fastattn::cpu {
namespace {

constexpr int kRows = 4;   // x rows per pass: kRows x kCols accumulators (16 of 32 zmm)
constexpr int kCols = 4;   // w rows (output columns) per block

// Bytes of w per parallel task: small layers (k/v projections of a few hundred KB) stay on one
// or two threads, where a fork would cost more than the work.
constexpr int64_t kTaskBytes = 64 * 1024;

// Pairwise lane sums of a and b side by side: [a0+a1, a2+a3, .., b0+b1, b2+b3, ..].
inline fVec fold(const fVec& a, const fVec& b) {
  const auto [even, odd] = at::vec::deinterleave2(a, b);
  return even + odd;
}

// Lane c of the result is the sum of all lanes of acc[c], for c < C <= 4: a transposing fold
// tree (two levels leave kF/4 lanes per accumulator, in order; then the vector folds onto
// itself until one lane each is left) -- about half the work of C horizontal sums.
template <int C>
inline fVec column_sums(const fVec* acc) {
  static_assert(C >= 1 && C <= 4 && kF >= 4, "column_sums folds up to 4 accumulators");
  const fVec zero(0.f);
  auto at = [&](int c) -> const fVec& { return c < C ? acc[c] : zero; };
  fVec v = fold(fold(at(0), at(1)), fold(at(2), at(3)));
  for (int64_t lanes = kF / 4; lanes > 1; lanes /= 2) v = fold(v, v);
  return v;
}

// y[r][c] = sum_k x[r][k] * w[c][k] for R rows x[0..R) and C rows w[0..C); y[r][c] at
// y + r * ldy + c, plus bias[c] when bias is not null. `next`: the C weight rows of the next
// block (ldw apart), asked for line by line alongside this block's loads, or nullptr.
template <typename T, int R, int C>
void dot_block(const T* x, int64_t ldx, const T* w, int64_t ldw, int64_t k, const T* bias,
               T* y, int64_t ldy, const T* next) {
  fVec acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = fVec(0.f);
  }
  // One step: n <= kF columns at j (n < kF only at the tail, whose padding lanes load 0).
  auto step = [&](int64_t j, int64_t n) {
    fVec wv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) wv[c] = load_f(w + c * ldw + j, n);
    if (next != nullptr) {
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) prefetch_line(next + c * ldw, j);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const fVec xv = load_f(x + r * ldx + j, n);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  };
  int64_t j = 0;
  for (; j + kF <= k; j += kF) step(j, kF);
  if (j < k) step(j, k - j);
  for (int r = 0; r < R; ++r) {
    __at_align__ float sums[kF];
    column_sums<C>(acc[r]).store(sums);
    for (int c = 0; c < C; ++c) {
      const float v = bias != nullptr ? sums[c] + static_cast<float>(bias[c]) : sums[c];
      y[r * ldy + c] = static_cast<T>(v);
    }
  }
}

// All m rows against the C weight rows starting at column n0. The first row group also asks
// for the next block's weight rows: the later groups read this block from L1 and request
// nothing from memory, and a block's four row streams jump to new pages that the hardware
// prefetcher only finds after a miss. Measured on 300 distinct 1376x512 fp32 weights (DRAM,
// 2 threads): 4 rows 1.29x, 16 rows 1.15x, 1 row 1.03x faster than without; prefetching the
// same rows further ahead gained about half of that.
template <typename T, int C>
void column_block(const LinearParams& p, int64_t n0) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w) + n0 * p.ldw;
  const T* bias = p.bias != nullptr ? static_cast<const T*>(p.bias) + n0 : nullptr;
  T* y = static_cast<T*>(p.y) + n0;
  const T* next = n0 + C < p.n ? w + C * p.ldw : nullptr;
  for (int64_t r0 = 0; r0 < p.m; r0 += kRows, next = nullptr) {
    const T* xr = x + r0 * p.ldx;
    T* yr = y + r0 * p.n;
    switch (std::min<int64_t>(kRows, p.m - r0)) {
      case 4: dot_block<T, 4, C>(xr, p.ldx, w, p.ldw, p.k, bias, yr, p.n, next); break;
      case 3: dot_block<T, 3, C>(xr, p.ldx, w, p.ldw, p.k, bias, yr, p.n, next); break;
      case 2: dot_block<T, 2, C>(xr, p.ldx, w, p.ldw, p.k, bias, yr, p.n, next); break;
      default: dot_block<T, 1, C>(xr, p.ldx, w, p.ldw, p.k, bias, yr, p.n, next); break;
    }
  }
}

template <typename T>
void linear_typed(const LinearParams& p) {
  const int64_t blocks = (p.n + kCols - 1) / kCols;
  const int64_t block_bytes = kCols * p.k * static_cast<int64_t>(sizeof(T));
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(block_bytes, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kCols;
      switch (std::min<int64_t>(kCols, p.n - n0)) {
        case 4: column_block<T, 4>(p, n0); break;
        case 3: column_block<T, 3>(p, n0); break;
        case 2: column_block<T, 2>(p, n0); break;
        default: column_block<T, 1>(p, n0); break;
      }
    }
  });
}

}  // namespace

void linear_forward(const LinearParams& p) {
  if (p.m == 0 || p.n == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) { linear_typed<decltype(tag)>(p); });
}

}  // namespace fastattn::cpu
