// The CPU kernels compiled for AVX-512 (F, VL, DQ, BW; x86-64 only) with 64-byte vectors, picked
// at run time on CPUs that have them (hgru_cpu.cpp). Like kernels_avx2.cpp, a target pragma
// rather than per-file flags. GCC's prefer-vector-width=512 lets the `omp simd` loops use the full
// registers (it otherwise keeps to 256 bits on most tunings); the explicit vectors of
// kernels_impl.h are 64 bytes here either way. On the CPU this was measured on (Zen 5, one
// thread, B4-C25-150x150) the transcendental-bound passes run in about half their AVX2 time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")
#endif

#define CRBP_ISA avx512
#define CRBP_SIMD_BYTES 64
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
