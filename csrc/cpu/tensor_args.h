// Torch-facing glue shared by csrc/*.cpp: argument checks that name the argument, tensor ->
// params conversion, and running a kernel on the tensor's device (CPU kernel or CUDA launch on
// the current stream). Not included by the kernels themselves.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/types.h"

#if FASTATTN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace fastattn {

inline DType dtype_of(const at::Tensor& t, const char* fn, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, fn, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return DType::kFloat32;
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* fn,
                         const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

inline void check_dtype(const at::Tensor& t, const at::Tensor& ref, const char* fn,
                        const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* fn,
                        const char* name) {
  TORCH_CHECK(t.sizes() == expected, fn, ": ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

// Checks for the tensors a CPU kernel reads directly (attention, varlen, KV cache). Each message
// starts "<fn>: <name> must be ..." and says what was passed instead.

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

inline void check_scalar_type(const at::Tensor& t, at::ScalarType dtype, const char* fn,
                              const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must be ", dtype_name(dtype),
              ", got ", dtype_name(t.scalar_type()));
}

// q, k, v of an attention kernel: `ndim`-D CPU tensors (layout names the dims, e.g.
// "(B, H, S, D)"), float32/float16/bfloat16, k and v with q's dtype. Returns that dtype.
inline DType check_qkv_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           int64_t ndim, const char* fn, const char* layout,
                           const char* k_name = "k", const char* v_name = "v") {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, k_name}, std::pair{&v, v_name}}) {
    TORCH_CHECK(t->device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ",
                t->device());
    TORCH_CHECK(t->dim() == ndim, fn, ": ", name, " must be ", ndim, "-D ", layout, ", got ",
                t->dim(), "-D");
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16 ||
                    t->scalar_type() == at::kHalf,
                fn, ": ", name, " must be float32, bfloat16 or float16, got ",
                t->scalar_type());
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), fn,
              ": ", k_name, " and ", v_name, " must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type(), " and ", v.scalar_type());
  return dtype_of(q, fn, "q");
}

// A CPU tensor of exactly `dtype` and `shape` (shape_what says whose, e.g. "(B, H, Sq)" or
// "of q's shape").
inline void check_cpu_tensor(const at::Tensor& t, const char* fn, const char* name,
                             at::ScalarType dtype, at::IntArrayRef shape,
                             const char* shape_what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape, fn, ": ",
              name, " must be a ", dtype_name(dtype), " CPU tensor ", shape_what, " = ", shape,
              ", got ", dtype_name(t.scalar_type()), " ", t.sizes(), " on ", t.device());
}

// An index tensor a kernel follows (offsets, lengths, page tables): an `ndim`-D CPU tensor of
// `dtype` with `rows` entries in dim 0 (rows_what says why, e.g. "q's batch"). Its values are
// the caller's to check.
inline void check_index_tensor(const at::Tensor& t, const char* fn, const char* name,
                               at::ScalarType dtype, int64_t ndim, int64_t rows,
                               const char* rows_what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == ndim &&
                  t.size(0) == rows,
              fn, ": ", name, " must be a ", ndim, "-D ", dtype_name(dtype), " CPU tensor with ",
              rows, " rows (", rows_what, "), got ", dtype_name(t.scalar_type()), " ",
              t.sizes(), " on ", t.device());
}

// ALiBi slopes of a CPU attention kernel: None, or a contiguous float32 (B, H) tensor on
// `ref`'s device (the public functions normalise (H,) and (B, H) to that). Returns the data
// pointer, or null without slopes. Read-only by the kernels, so no copy is kept.
inline const float* alibi_slopes_ptr(const std::optional<at::Tensor>& slopes, int64_t B,
                                     int64_t H, const at::Tensor& ref, const char* fn) {
  if (!slopes.has_value() || !slopes->defined()) return nullptr;
  const at::Tensor& a = *slopes;
  TORCH_CHECK(a.device() == ref.device(), fn, ": alibi_slopes must be on q's device (",
              ref.device(), "), got ", a.device());
  TORCH_CHECK(a.scalar_type() == at::kFloat, fn, ": alibi_slopes must be float32, got ",
              dtype_name(a.scalar_type()));
  TORCH_CHECK(a.dim() == 2 && a.size(0) == B && a.size(1) == H, fn,
              ": alibi_slopes must have shape (B, H) = (", B, ", ", H, "), got ", a.sizes());
  TORCH_CHECK(a.is_contiguous(), fn, ": alibi_slopes must be contiguous, got strides ",
              a.strides());
  return a.data_ptr<float>();
}

// Makes the last dim contiguous (stride 1) if it is not; a copy only in that case.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Rows of t (all dims but the last) as a RowIndexer, merging dims that are contiguous with
// each other and dropping size-1 dims. t's last dim must be contiguous; t may be replaced by a
// contiguous copy if its layout needs more than kMaxRowDims dims.
inline RowIndexer rows_of(at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == t.stride(d) * t.size(d)) {
      dims.back() = {dims.back().first * t.size(d), t.stride(d)};
    } else {
      dims.emplace_back(t.size(d), t.stride(d));
    }
  }
  if (static_cast<int>(dims.size()) > kMaxRowDims) {
    t = t.contiguous();
    dims.assign(1, {t.numel() / std::max<int64_t>(t.size(-1), 1), t.size(-1)});
  }
  RowIndexer r;
  r.ndim = static_cast<int32_t>(dims.size());
  for (int i = 0; i < r.ndim; ++i) {
    r.sizes[i] = dims[i].first;
    r.strides[i] = dims[i].second;
  }
  return r;
}

inline const float* opt_f32_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

// Runs cpu() for CPU tensors, or gpu(stream) for CUDA tensors (with t's device current).
template <typename Cpu, typename Gpu>
void run_on_device(const at::Tensor& t, const char* fn, Cpu&& cpu, Gpu&& gpu) {
  if (t.is_cpu()) {
    cpu();
    return;
  }
#if FASTATTN_WITH_CUDA
  if (t.is_cuda()) {
    const c10::cuda::CUDAGuard guard(t.device());
    const cudaError_t err = gpu(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
    return;
  }
#else
  (void)gpu;
#endif
  TORCH_CHECK(false, fn, ": no kernel for device ", t.device());
}

}  // namespace fastattn
