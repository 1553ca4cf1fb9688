// Selects the widest at::vec implementation the compiler targets, for every CPU kernel.
//
// ATen's own build compiles one copy of its vectorised code per capability and tells at::vec
// which one through CPU_CAPABILITY_*; without them at::vec falls back to its scalar/256-bit
// code. setup.py passes the target as compiler flags only (build_support.cpu_arch:
// FASTATTN_CPU_ARCH=portable -> -mavx2 -mfma -mf16c, native / other values -> -march=...), so
// the macros are derived here from the compiler's own target macros. Every translation unit is
// compiled with the same flags, so they all agree. CPU_CAPABILITY also names the inline
// namespace at::vec::CPU_CAPABILITY: ours is distinct from libtorch's, so our inline functions
// never merge with its differently-compiled copies.
// Include this header (directly or through cpu/vec.h) before any ATen vectorization header.
#pragma once

#if defined(__at_align__)
#error "csrc/cpu/cpu_capability.h must be included before any ATen vectorization header"
#endif

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY fastattn_avx512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)  // ATen's AVX2 half needs F16C
#define CPU_CAPABILITY fastattn_avx2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY fastattn_default
#endif
#endif
