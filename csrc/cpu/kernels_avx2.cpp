// The CPU kernels compiled for AVX2 + FMA (x86-64 only), picked at run time on CPUs that have
// them (hgru_cpu.cpp). A target pragma rather than a -mavx2 flag, so that the rest of the
// extension stays baseline code and the build needs no per-file flags.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif

#define CRBP_ISA avx2
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
