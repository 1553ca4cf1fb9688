// Torch-free basics shared by the CPU kernels, the CUDA kernels and the torch-facing .cpp files.
#pragma once
#include <cmath>
#include <cstdint>

// Per-element math is written once and compiled for host and device: nvcc sees
// __host__ __device__, g++ sees a plain inline function.
#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fastattn {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// An additive mask: none, bool (true = keep; stored as one byte per element) or floating (added
// to the scores). A floating mask's dtype is the op's to say: softmax's has x's dtype, the
// attention kernels' has AttentionParams::mask_dtype.
enum class MaskKind : int32_t { kNone = 0, kBool = 1, kFloat = 2 };

// Addresses the rows of a tensor whose last dim is the reduced/row dim: row r of the flattened
// leading dims lives at element offset row_offset(r). Leading dims are kept separately so that
// expanded (stride 0) and sliced views need no copy.
constexpr int kMaxRowDims = 6;

struct RowIndexer {
  int32_t ndim = 0;                  // number of leading dims (0: a single row)
  int64_t sizes[kMaxRowDims] = {};
  int64_t strides[kMaxRowDims] = {};  // in elements
};

FA_HD int64_t row_offset(const RowIndexer& r, int64_t row) {
  int64_t off = 0;
  for (int d = r.ndim - 1; d >= 0; --d) {
    const int64_t i = row % r.sizes[d];
    row /= r.sizes[d];
    off += i * r.strides[d];
  }
  return off;
}

}  // namespace fastattn
