// Selects the widest at::vec implementation the compiler targets, for the attention kernels.
//
// setup.py compiles with -march=native but does not define ATen's CPU_CAPABILITY_* macros, and
// without them at::vec falls back to 256-bit vectors. We define them from the compiler's own
// target macros. CPU_CAPABILITY also names the inline namespace at::vec::CPU_CAPABILITY, so our
// Vectorized<float> (512-bit) is a distinct type from the one other translation units of the
// extension may see: no ODR clash between differently-configured TUs.
// Include this header before any ATen vec header.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY FASTATTN_AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)  // ATen's AVX2 half needs F16C
#define CPU_CAPABILITY FASTATTN_AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY FASTATTN_DEFAULT
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
