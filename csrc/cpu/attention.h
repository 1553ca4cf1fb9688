// CPU flash attention: parameters and entry points (torch-free interface; the kernels use ATen's
// vectorisation, threading and BLAS internally). csrc/attention.cpp checks arguments, allocates
// and fills these structs.
#pragma once

#include <cstdint>

#include "common/dropout_rng.h"
#include "common/types.h"

namespace fastattn::cpu {

// Strides are in elements; the head dim (last dim) is contiguous for q, k, v, out, dout.
struct AttentionParams {
  DType dtype = DType::kFloat32;
  int64_t B = 0, H = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0;

  const void* q = nullptr;  // (B, H, Sq, D)
  const void* k = nullptr;  // (B, Hkv, Sk, D)
  const void* v = nullptr;  // (B, Hkv, Sk, D)
  int64_t q_sb = 0, q_sh = 0, q_ss = 0;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;

  MaskKind mask_kind = MaskKind::kNone;
  DType mask_dtype = DType::kFloat32;  // of a kFloat mask (its own, not necessarily q's)
  const void* mask = nullptr;  // (B, H, Sq, Sk), broadcast dims have stride 0
  int64_t m_sb = 0, m_sh = 0, m_sq = 0, m_sk = 0;

  const int64_t* key_lengths = nullptr;  // (B,) or null

  float scale = 1.f;
  float softcap = 0.f;     // 0 = off
  bool causal = false;
  int64_t shift = 0;       // 0 (top-left) or Sk - Sq (bottom-right)
  int64_t window_left = -1, window_right = -1;
  // ALiBi: slopes (B, H) fp32 contiguous (per query head; B = sequences in packed mode) or
  // null. Every finished score gets - slope[b, h] * |i + shift - j| (shift: the causal one).
  const float* alibi = nullptr;

  // Dropout on P (after the softmax, lse undropped): kept entries are scaled by
  // dropout_scale = 1 / (1 - p), the others are 0. See common/dropout_rng.h.
  bool dropout = false;
  DropoutKey dropout_key;
  float dropout_scale = 1.f;

  // Forward outputs / backward inputs. out has q's dtype; lse is fp32 (B, H, Sq) contiguous.
  void* out = nullptr;
  int64_t o_sb = 0, o_sh = 0, o_ss = 0;
  float* lse = nullptr;

  // Packed variable-length mode (varlen_attention) when cu_q is set: cu_q / cu_k (B+1,) are
  // the offsets of each sequence's rows along the token dim of q/out/dout and k/v (row i of
  // sequence b is token cu_q[b] + i; the *_sb strides are 0). Sq / Sk then hold the max
  // sequence lengths (the task grid; dropout indexes its RNG as the dense (B, H, Sq, Sk) case),
  // every sequence is bottom-right aligned (shift = its Sk - its Sq), lse is (H, total_q),
  // and dq/dk/dv are (total, heads, D) contiguous. No mask or key_lengths in this mode.
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t total_q = 0;
};

// Where sequence (batch entry) b lives: first q row and k row, lengths and causal shift.
struct Sequence {
  int64_t q0, k0, Sq, Sk, shift;
};
inline Sequence sequence(const AttentionParams& p, int64_t b) {
  if (!p.cu_q) return {0, 0, p.Sq, p.Sk, p.shift};
  const int64_t q0 = p.cu_q[b], k0 = p.cu_k[b];
  const int64_t sq = p.cu_q[b + 1] - q0, sk = p.cu_k[b + 1] - k0;
  return {q0, k0, sq, sk, sk - sq};
}

// Index of lse[b, h, i] (i counted within the sequence): (B, H, Sq), or (H, total_q) packed.
inline int64_t lse_index(const AttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return p.cu_q ? h * p.total_q + p.cu_q[b] + i : (b * p.H + h) * p.Sq + i;
}

struct AttentionGrads {
  const void* dout = nullptr;  // (B, H, Sq, D), q's dtype
  int64_t do_sb = 0, do_sh = 0, do_ss = 0;
  // Outputs, contiguous: dq (B, H, Sq, D), dk/dv (B, Hkv, Sk, D) in q's dtype;
  // dmask fp32 (B, H, Sq, Sk) zero-filled by the caller, or null.
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dmask = nullptr;
};

void attention_forward(const AttentionParams& p);
// keep (B, H, Sq, Sk) contiguous: the keep decisions of p.dropout_key (only B, H, Sq, Sk used).
void attention_dropout_mask(const AttentionParams& p, bool* keep);
void attention_backward(const AttentionParams& p, const AttentionGrads& g);
// Probabilities exp(finish(q k^T) - lse) with p.lse as input (v, out and dropout unused): out
// contiguous (B, H, Sq, Sk), or (B, Sq, Sk) averaged over heads when `average`, q's dtype.
void attention_weights(const AttentionParams& p, bool average, void* out);

}  // namespace fastattn::cpu
