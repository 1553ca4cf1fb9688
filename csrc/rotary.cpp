// fastattn::rotary_forward (functional, out= and in-place variants): checks, CPU and CUDA
// registration.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/kernels.h"
#include "cpu/tensor_args.h"
#if FASTATTN_WITH_CUDA
#include "cuda/launch.h"
#endif

namespace fastattn {
namespace {

using OptTensor = std::optional<at::Tensor>;

void rotary_run(const char* fn, const at::Tensor& x, const at::Tensor& cos_in,
                const at::Tensor& sin_in, bool interleaved, const OptTensor& offsets_in,
                bool conjugate, const at::Tensor& out, const OptTensor& positions_in) {
  RotaryParams p;
  p.dtype = dtype_of(x, fn, "x");
  TORCH_CHECK(x.dim() == 4, fn, ": x must be 4-D (batch, seq, heads, head_dim), got shape ",
              x.sizes());
  check_device(out, x, fn, "out", "x");
  check_dtype(out, x, fn, "out", "x");
  check_shape(out, x.sizes(), fn, "out");
  TORCH_CHECK(cos_in.dim() == 2, fn, ": cos must be 2-D (s_cache, rot_dim / 2), got shape ",
              cos_in.sizes());
  check_shape(sin_in, cos_in.sizes(), fn, "sin (the shape of cos)");
  check_device(cos_in, x, fn, "cos", "x");
  check_device(sin_in, x, fn, "sin", "x");
  TORCH_CHECK(at::isFloatingType(cos_in.scalar_type()) && at::isFloatingType(sin_in.scalar_type()),
              fn, ": cos and sin must be floating point, got ", cos_in.scalar_type(), " and ",
              sin_in.scalar_type());
  const int64_t batch = x.size(0), seqlen = x.size(1), head_dim = x.size(3);
  const int64_t rot_dim = 2 * cos_in.size(1), s_cache = cos_in.size(0);
  TORCH_CHECK(rot_dim <= head_dim, fn, ": cos/sin rotate ", rot_dim,
              " features (2 * cos.shape[1]) but x's head_dim is ", head_dim);
  at::Tensor offsets;
  if (offsets_in.has_value() && offsets_in->defined()) {
    offsets = *offsets_in;
    check_device(offsets, x, fn, "offsets", "x");
    TORCH_CHECK(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong, fn,
                ": offsets must be int32 or int64, got ", offsets.scalar_type());
    check_shape(offsets, {batch}, fn, "offsets");
    offsets = offsets.to(at::kLong).contiguous();
  }
  // positions (B, S): the cache row of every token (left-padded batches, packed sequences).
  at::Tensor positions;
  if (positions_in.has_value() && positions_in->defined()) {
    positions = *positions_in;
    check_device(positions, x, fn, "positions", "x");
    TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, fn,
                ": positions must be int32 or int64, got ", positions.scalar_type());
    check_shape(positions, {batch, seqlen}, fn, "positions");
    TORCH_CHECK(!offsets.defined(), fn, ": pass offsets or positions, not both");
    positions = positions.to(at::kLong).contiguous();
  }
  if (x.numel() == 0) return;
  if (positions.defined() && positions.is_cpu() && positions.numel() > 0) {
    // a plain loop: min()/max() would be two ops and two item() reads per call, which at
    // one decode token cost more than the rotation
    const int64_t* pos = positions.data_ptr<int64_t>();
    const auto [lo_it, hi_it] = std::minmax_element(pos, pos + positions.numel());
    const int64_t lo = *lo_it, hi = *hi_it;
    TORCH_CHECK(lo >= 0 && hi < s_cache, fn, ": positions must lie in [0, ", s_cache,
                "), got [", lo, ", ", hi, "]");
  }
  // Positions must lie in the cache; checked where it costs no device sync.
  if (positions.defined()) {
    // checked above (CPU); CUDA kernels yield NaN for a position outside the cache
  } else if (!offsets.defined()) {
    TORCH_CHECK(seqlen <= s_cache, fn, ": seq length ", seqlen, " exceeds the cos/sin cache (",
                s_cache, " positions)");
  } else if (offsets.is_cpu()) {
    const int64_t lo = offsets.min().item<int64_t>(), hi = offsets.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi + seqlen <= s_cache, fn, ": offsets + positions must lie in [0, ",
                s_cache, "), got offsets in [", lo, ", ", hi, "] with seq length ", seqlen);
  }
  at::Tensor cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.offsets = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  p.positions = positions.defined() ? positions.data_ptr<int64_t>() : nullptr;
  p.batch = batch;
  p.seqlen = seqlen;
  p.heads = x.size(2);
  p.head_dim = head_dim;
  p.rot_dim = rot_dim;
  p.s_cache = s_cache;
  for (int d = 0; d < 4; ++d) {
    p.x_strides[d] = x.stride(d);
    p.out_strides[d] = out.stride(d);
  }
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  run_on_device(
      x, fn, [&] { cpu::rotary_forward(p); },
      [&](auto stream) {
#if FASTATTN_WITH_CUDA
        return cuda::rotary::launch(p, stream);
#endif
      });
}

at::Tensor rotary_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                          bool interleaved, const OptTensor& offsets, bool conjugate,
                          const OptTensor& positions) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  rotary_run("fastattn.rotary_forward", x, cos, sin, interleaved, offsets, conjugate, out,
             positions);
  return out;
}

void rotary_forward_out(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        bool interleaved, const OptTensor& offsets, bool conjugate,
                        const at::Tensor& out, const OptTensor& positions) {
  constexpr const char* fn = "fastattn.rotary_forward_out";
  // A partial overlap would let one row's writes feed another row's reads.
  if (out.defined() && x.defined() && out.numel() > 0) {
    TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, fn,
                ": out must not overlap itself (an expanded tensor?)");
    const auto overlap = at::get_overlap_status(x, out);
    TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, fn,
                ": out must not share memory with x; use rotary_forward_inplace");
  }
  rotary_run(fn, x, cos, sin, interleaved, offsets, conjugate, out, positions);
}

void rotary_forward_inplace(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            bool interleaved, const OptTensor& offsets, bool conjugate,
                            const OptTensor& positions) {
  constexpr const char* fn = "fastattn.rotary_forward_inplace";
  if (x.defined() && x.numel() > 0) {
    TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, fn,
                ": x must not overlap itself (an expanded tensor?)");
  }
  rotary_run(fn, x, cos, sin, interleaved, offsets, conjugate, x, positions);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  m.def("rotary_forward(Tensor x, Tensor cos, Tensor sin, bool interleaved, Tensor? offsets,"
        " bool conjugate, Tensor? positions=None) -> Tensor");
  m.def("rotary_forward_out(Tensor x, Tensor cos, Tensor sin, bool interleaved, Tensor? offsets,"
        " bool conjugate, Tensor(a!) out, Tensor? positions=None) -> ()");
  m.def("rotary_forward_inplace(Tensor(a!) x, Tensor cos, Tensor sin, bool interleaved,"
        " Tensor? offsets, bool conjugate, Tensor? positions=None) -> ()");
}

TORCH_LIBRARY_IMPL(fastattn_kernels, CPU, m) {
  m.impl("rotary_forward", &rotary_forward);
  m.impl("rotary_forward_out", &rotary_forward_out);
  m.impl("rotary_forward_inplace", &rotary_forward_inplace);
}

#if FASTATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastattn_kernels, CUDA, m) {
  m.impl("rotary_forward", &rotary_forward);
  m.impl("rotary_forward_out", &rotary_forward_out);
  m.impl("rotary_forward_inplace", &rotary_forward_inplace);
}
#endif

}  // namespace fastattn
