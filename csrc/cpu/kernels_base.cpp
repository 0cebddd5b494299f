// The CPU kernels compiled for the baseline ISA of the build (SSE2 on x86-64, NEON on AArch64):
// the fallback on every CPU.
#define CRBP_ISA base
#include "kernels_impl.h"
