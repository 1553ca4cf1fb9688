// Torch-facing attention ops of fastattn._C: argument checks, allocation, registration.
// The kernels live in csrc/cpu/attention_*.cpp and see only fastattn::cpu::AttentionParams.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "cpu/attention.h"
#include "cpu/tensor_args.h"

namespace fastattn {
namespace {

using cpu::AttentionGrads;
using cpu::AttentionParams;

// Kernels read the head dim contiguously and hand rows to BLAS with ld = stride(-2).
at::Tensor rows_contiguous(const at::Tensor& t) {
  const bool ok = t.stride(-1) == 1 && (t.size(-2) <= 1 || t.stride(-2) >= t.size(-1));
  return ok ? t : t.contiguous();
}

// Returns q's dtype.
DType check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const DType dtype = check_qkv_cpu(q, k, v, 4, "attention (cpu)", "(B, H, S, D)");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "attention (cpu): k and v must have q's batch size ", q.size(0));
  TORCH_CHECK(k.size(1) >= 1 && v.size(1) == k.size(1) && q.size(1) % k.size(1) == 0,
              "attention (cpu): k/v head count must be equal and divide q's head count ",
              q.size(1), ", got k ", k.size(1), " and v ", v.size(1));
  TORCH_CHECK(v.size(2) == k.size(2), "attention (cpu): v must have k's sequence length ",
              k.size(2), ", got ", v.size(2));
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(3) == q.size(3),
              "attention (cpu): k and v must have q's head dim ", q.size(3), ", got ",
              k.size(3), " and ", v.size(3));
  TORCH_CHECK(q.size(3) >= 1, "attention (cpu): q must have a head dim >= 1");
  return dtype;
}

void set_dropout(AttentionParams& p, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "attention (cpu): dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout = dropout_p > 0.0;
  p.dropout_key = dropout_key(seed, offset, dropout_p);
  p.dropout_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
}

// Fills everything but the outputs. Keeps the (possibly made contiguous) inputs alive in `keep`.
AttentionParams make_params(const at::Tensor& q_in, const at::Tensor& k_in,
                            const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
                            double scale, bool causal, bool bottom_right, int64_t window_left,
                            int64_t window_right, double softcap,
                            const std::optional<at::Tensor>& key_lengths, double dropout_p,
                            int64_t seed, int64_t offset, std::vector<at::Tensor>& keep) {
  const DType dtype = check_qkv(q_in, k_in, v_in);
  TORCH_CHECK(softcap >= 0, "attention (cpu): softcap must be >= 0 (0 = off), got ", softcap);
  TORCH_CHECK(std::isfinite(softcap), "attention (cpu): softcap must be finite, got ", softcap);
  TORCH_CHECK(std::isfinite(scale), "attention (cpu): scale must be finite, got ", scale);
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "attention (cpu): window_left/window_right must be >= 0 or -1 (off), got ",
              window_left, " and ", window_right);
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  keep.insert(keep.end(), {q, k, v});

  AttentionParams p;
  p.dtype = dtype;
  p.B = q.size(0); p.H = q.size(1); p.Sq = q.size(2); p.D = q.size(3);
  p.Hkv = k.size(1); p.Sk = k.size(2);
  p.q = q.data_ptr(); p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_ss = q.stride(2);
  p.k = k.data_ptr(); p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_ss = k.stride(2);
  p.v = v.data_ptr(); p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_ss = v.stride(2);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.causal = causal;
  p.shift = bottom_right ? p.Sk - p.Sq : 0;
  p.window_left = window_left;
  p.window_right = window_right;
  set_dropout(p, dropout_p, seed, offset);

  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), "attention (cpu): mask must be a CPU tensor, got ",
                m.device());
    TORCH_CHECK(m.dim() == 4 && m.size(0) == p.B && m.size(1) == p.H && m.size(2) == p.Sq &&
                    m.size(3) == p.Sk,
                "attention (cpu): mask must be expanded to (B, H, Sq, Sk) = (", p.B, ", ", p.H,
                ", ", p.Sq, ", ", p.Sk, "), got ", m.sizes());
    switch (m.scalar_type()) {
      case at::kBool: p.mask_kind = MaskKind::kBool; break;
      case at::kFloat:
      case at::kBFloat16:
      case at::kHalf:
        p.mask_kind = MaskKind::kFloat;
        p.mask_dtype = dtype_of(m, "attention (cpu)", "mask");
        break;
      default:
        TORCH_CHECK(false, "attention (cpu): mask must be bool or float32/bfloat16/float16, got ",
                    m.scalar_type());
    }
    // The kernels index mask[b, h, i, j] = data + b*s0 + h*s1 + i*s2 + j*s3 for indices inside
    // its sizes, which stays in bounds for any view with non-negative strides.
    for (int64_t d = 0; d < 4; ++d)
      TORCH_CHECK(m.stride(d) >= 0, "attention (cpu): mask strides must be >= 0, got ",
                  m.strides());
    p.mask = m.data_ptr();
    p.m_sb = m.stride(0); p.m_sh = m.stride(1); p.m_sq = m.stride(2); p.m_sk = m.stride(3);
    keep.push_back(m);
  }
  if (key_lengths.has_value() && key_lengths->defined()) {
    const at::Tensor& kl = *key_lengths;
    TORCH_CHECK(kl.device().is_cpu(), "attention (cpu): key_lengths must be a CPU tensor, got ",
                kl.device());
    TORCH_CHECK(kl.dim() == 1 && kl.size(0) == p.B,
                "attention (cpu): key_lengths must have shape (B,) = (", p.B, "), got ",
                kl.sizes());
    TORCH_CHECK(!at::isFloatingType(kl.scalar_type()) && kl.scalar_type() != at::kBool,
                "attention (cpu): key_lengths must be an integer tensor, got ",
                kl.scalar_type());
    const at::Tensor kl64 = kl.to(at::kLong).contiguous();
    // Checked, not clamped: a length outside [0, Sk] is a caller bug, not a request.
    if (kl64.numel() > 0) {
      const int64_t lo = kl64.min().item<int64_t>(), hi = kl64.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi <= p.Sk, "attention (cpu): key_lengths must be in [0, Sk] = [0, ",
                  p.Sk, "], got values in [", lo, ", ", hi, "]");
    }
    p.key_lengths = kl64.data_ptr<int64_t>();
    keep.push_back(kl64);
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, double scale, bool causal, bool bottom_right,
    int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& key_lengths, double dropout_p, int64_t seed,
    int64_t offset, const std::optional<at::Tensor>& alibi_slopes) {
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(q, k, v, mask, scale, causal, bottom_right, window_left,
                                  window_right, softcap, key_lengths, dropout_p, seed, offset,
                                  keep);
  p.alibi = alibi_slopes_ptr(alibi_slopes, p.B, p.H, q, "attention (cpu)");
  at::Tensor out = at::empty({p.B, p.H, p.Sq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Sq}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_ss = out.stride(2);
  p.lse = lse.data_ptr<float>();
  if (out.numel() > 0) cpu::attention_forward(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& mask,
    double scale, bool causal, bool bottom_right, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& key_lengths, bool mask_needs_grad,
    double dropout_p, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& alibi_slopes) {
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(q, k, v, mask, scale, causal, bottom_right, window_left,
                                  window_right, softcap, key_lengths, dropout_p, seed, offset,
                                  keep);
  constexpr const char* fn = "attention_backward (cpu)";
  p.alibi = alibi_slopes_ptr(alibi_slopes, p.B, p.H, q, fn);
  check_cpu_tensor(dout_in, fn, "dout", q.scalar_type(), q.sizes(), "of q's shape");
  check_cpu_tensor(out_in, fn, "out", q.scalar_type(), q.sizes(), "of q's shape");
  check_cpu_tensor(lse_in, fn, "lse", at::kFloat, {p.B, p.H, p.Sq}, "(B, H, Sq)");
  const bool float_mask = p.mask_kind == MaskKind::kFloat;
  TORCH_CHECK(!mask_needs_grad || float_mask,
              "attention_backward (cpu): mask_needs_grad=True needs a floating mask");

  const at::Tensor dout = rows_contiguous(dout_in), out = rows_contiguous(out_in);
  const at::Tensor lse = lse_in.contiguous();
  p.out = const_cast<void*>(out.data_ptr());
  p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_ss = out.stride(2);
  p.lse = const_cast<float*>(lse.data_ptr<float>());

  at::Tensor dq = at::empty({p.B, p.H, p.Sq, p.D}, q.options());
  at::Tensor dk = at::empty({p.B, p.Hkv, p.Sk, p.D}, q.options());
  at::Tensor dv = at::empty({p.B, p.Hkv, p.Sk, p.D}, q.options());
  at::Tensor dmask = mask_needs_grad
      ? at::zeros({p.B, p.H, p.Sq, p.Sk}, q.options().dtype(at::kFloat))
      : at::empty({0}, q.options().dtype(at::kFloat));

  AttentionGrads g;
  g.dout = dout.data_ptr();
  g.do_sb = dout.stride(0); g.do_sh = dout.stride(1); g.do_ss = dout.stride(2);
  g.dq = dq.data_ptr(); g.dk = dk.data_ptr(); g.dv = dv.data_ptr();
  g.dmask = mask_needs_grad ? dmask.data_ptr<float>() : nullptr;
  if (dq.numel() > 0 || dk.numel() > 0) {
    cpu::attention_backward(p, g);
  }
  return {dq, dk, dv, dmask};
}

at::Tensor attention_weights_cpu(const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& lse_in, const std::optional<at::Tensor>& mask,
                                 double scale, bool causal, bool bottom_right,
                                 int64_t window_left, int64_t window_right, double softcap,
                                 const std::optional<at::Tensor>& key_lengths, bool average) {
  std::vector<at::Tensor> keep;
  // k stands in for v, which the weights never read.
  AttentionParams p = make_params(q, k, k, mask, scale, causal, bottom_right, window_left,
                                  window_right, softcap, key_lengths, 0.0, 0, 0, keep);
  check_cpu_tensor(lse_in, "attention_weights (cpu)", "lse", at::kFloat, {p.B, p.H, p.Sq},
                   "(B, H, Sq)");
  const at::Tensor lse = lse_in.contiguous();
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  at::Tensor out = average ? at::empty({p.B, p.Sq, p.Sk}, q.options())
                           : at::empty({p.B, p.H, p.Sq, p.Sk}, q.options());
  if (out.numel() == 0) return out;
  if (p.H == 0) return out.zero_();
  cpu::attention_weights(p, average, out.data_ptr());
  return out;
}

at::Tensor attention_dropout_mask_cpu(int64_t B, int64_t H, int64_t Sq, int64_t Sk,
                                      double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(B >= 0 && H >= 0 && Sq >= 0 && Sk >= 0,
              "attention_dropout_mask: B, H, Sq, Sk must be >= 0, got (", B, ", ", H, ", ", Sq,
              ", ", Sk, ")");
  AttentionParams p;
  p.B = B; p.H = H; p.Sq = Sq; p.Sk = Sk;
  set_dropout(p, dropout_p, seed, offset);
  at::Tensor keep = at::empty({B, H, Sq, Sk}, at::TensorOptions().dtype(at::kBool));
  if (keep.numel() > 0) cpu::attention_dropout_mask(p, keep.data_ptr<bool>());
  return keep;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn_kernels, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, "
        "bool bottom_right, int window_left, int window_right, float softcap, "
        "Tensor? key_lengths, float dropout_p, int seed, int offset, "
        "Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? mask, float scale, bool causal, bool bottom_right, int window_left, "
        "int window_right, float softcap, Tensor? key_lengths, bool mask_needs_grad, "
        "float dropout_p, int seed, int offset, Tensor? alibi_slopes=None) -> (Tensor dq, "
        "Tensor dk, Tensor dv, Tensor dmask)");
  // Probabilities exp(s - lse) from the forward's lse (need_weights=True), per head
  // (B, H, Sq, Sk) or averaged over heads (B, Sq, Sk).
  m.def("attention_weights_forward(Tensor q, Tensor k, Tensor lse, Tensor? mask, float scale, "
        "bool causal, bool bottom_right, int window_left, int window_right, float softcap, "
        "Tensor? key_lengths, bool average) -> Tensor");
  // The keep mask (bool (B, H, Sq, Sk)) of attention_forward/backward's dropout, for callers
  // that rebuild the dropped probabilities (need_weights=True) and for tests.
  m.def("attention_dropout_mask(int B, int H, int Sq, int Sk, float dropout_p, int seed, "
        "int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn_kernels, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_weights_forward", &attention_weights_cpu);
}

// No tensor argument to dispatch on: the mask is built on the CPU whatever the caller wants.
TORCH_LIBRARY_IMPL(fastattn_kernels, CompositeExplicitAutograd, m) {
  m.impl("attention_dropout_mask", &attention_dropout_mask_cpu);
}

}  // namespace fastattn
