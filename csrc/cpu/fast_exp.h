// exp() for softmax arguments: x - max <= ~0, where the result must be exactly 0 for -inf
// (masked keys, empty rows) and NaN must stay NaN.
//
// ATen's exp_u20 (20 ulp) spends ~20 instructions per vector; with AVX-512's vscalefps doing
// the 2^n step (and flushing to 0 below the denormals) this takes 11 at ~3 ulp: the exp pass
// was half of an in-cache softmax. x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in two constants
// so r is exact to ~1 ulp), e^r by a degree-5 polynomial fitted for relative error on
// Chebyshev nodes (1.5e-7 with these fp32 coefficients), times 2^n.
// Include after cpu/cpu_capability.h (directly or through cpu/vec.h): it picks the at::vec width.
#pragma once

namespace fastattn::cpu {

template <typename V>
inline V exp_softmax(const V& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // Clamp to [-110, 88]: below -103.3 the result is 0 anyway (and -110 keeps n finite);
  // min/max with the constant first return x itself when x is NaN.
  __m512 t = _mm512_max_ps(_mm512_set1_ps(-110.f), __m512(x));
  t = _mm512_min_ps(_mm512_set1_ps(88.f), t);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), t);   // ln2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);       // ln2 - high bits
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00829171669f), _mm512_set1_ps(0.0419150293f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.166676626f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.499989003f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.999999642f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.00000012f));
  return V(_mm512_scalef_ps(p, n));  // p * 2^n; n <= -159 gives 0
#else
  return x.exp_u20();
#endif
}

}  // namespace fastattn::cpu
