// The hGRU passes of crbp_fast/hgru/reference.py on at::Tensor, per device.
//
// ops.cpp validates every argument (TORCH_CHECK: device, dtype, contiguity, shapes) and then
// calls the CPU (cpu/hgru_cpu.cpp) or CUDA (cuda/hgru_cuda.cu) implementation declared here;
// those assume valid arguments. Conventions:
// - feature maps: contiguous (B, C, H, W), float32 / float64 on CPU, float32 / bfloat16 on CUDA;
// - parameters: contiguous (C,) vectors and (C, C) 1x1-conv matrices in the "opmath" dtype
//   (float64 for float64 maps, else float32);
// - statistics: contiguous (B, C) mean and invstd in the opmath dtype, one entry per (b, c)
//   even for "batch" (every b of a channel then holds the same value);
// - linearize outputs that do not apply (xhat and invstd for norm "none") are undefined tensors;
// - an `out` argument, when defined, is the buffer to write instead of a new one (ops.cpp checks
//   which inputs it may alias: only ones whose every element the kernel reads before it writes
//   the same element of out).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace crbp {

enum class NormKind { kNone, kBatch, kGroup };

// Frequencies per tile of the spectral_mix kernel spectrum layout (crbp_fast/conv/fft.py,
// MIX_LANES): the spectrum is (ceil(P / 32), O, C, 2, 32), real parts then imaginary parts.
constexpr std::int64_t kSpectralMixLanes = 32;

// A normalisation of the conv outputs (reference.NormSpec): statistics over (B, H, W) per
// channel for kBatch, over (C / groups, H, W) per (sample, group) for kGroup.
struct Norm {
  NormKind kind = NormKind::kNone;
  at::Tensor weight;  // (C,), undefined for kNone
  at::Tensor bias;    // (C,), undefined for kNone
  double eps = 1e-3;
  std::int64_t groups = 1;
};

// Outputs are allocated with alloc_output: when the environment variable
// CRBP_FAST_DEBUG_NAN_FILL=1 they are filled with NaN first, so a kernel that fails to write an
// element leaves a NaN that the tests catch.
at::Tensor alloc_output(const at::Tensor& like);
at::Tensor alloc_stats(const at::Tensor& like_map);  // (B, C) in the opmath dtype

#define CRBP_DECLARE_DEVICE_PASSES                                                                                 \
  std::tuple<at::Tensor, at::Tensor> norm_stats(const at::Tensor& c, const Norm& norm);                              \
  at::Tensor normalize(const at::Tensor& c, const Norm& norm);                                                       \
  at::Tensor norm_vjp(const at::Tensor& dy, const at::Tensor& xhat, const at::Tensor& invstd, const Norm& norm,     \
                      const at::Tensor& out);                                                                        \
  /* {hg} or, linearizing, {hg, g1, dhg_to_dm1} */                                                                   \
  std::vector<at::Tensor> gate_inh(const at::Tensor& h, const at::Tensor& u1_weight, const at::Tensor& u1_bias,     \
                                   bool linearize);                                                                  \
  /* {h1, g2} or, linearizing, {h1, g2, xhat1, invstd1, dh1_to_dc1, dh1_to_dh} */                                    \
  std::vector<at::Tensor> inhibit(const at::Tensor& c1_raw, const at::Tensor& x, const at::Tensor& h,              \
                                  const Norm& norm, const at::Tensor& alpha, const at::Tensor& mu,                  \
                                  const at::Tensor& u2_weight, const at::Tensor& u2_bias, bool linearize,           \
                                  const at::Tensor& h1_out, const at::Tensor& g2_out);                              \
  /* {F} or, linearizing, {F, xhat2, invstd2, v_to_dc2, v_to_dh1, v_to_dm2, v_to_dh} */                              \
  std::vector<at::Tensor> excite_mix(const at::Tensor& c2_raw, const at::Tensor& h, const at::Tensor& h1,          \
                                     const at::Tensor& g2, const Norm& norm, const at::Tensor& kappa,               \
                                     const at::Tensor& gamma, const at::Tensor& omega, bool linearize,              \
                                     const at::Tensor& out);                                                        \
  /* {dc2, dh1 (without the exc-conv term), dh} */                                                                   \
  std::vector<at::Tensor> vjp_excite_mix(const at::Tensor& v, const at::Tensor& v_to_dc2,                          \
                                         const at::Tensor& v_to_dh1, const at::Tensor& v_to_dm2,                    \
                                         const at::Tensor& v_to_dh, const at::Tensor& u2_weight,                    \
                                         const at::Tensor& dc2_out, const at::Tensor& dh1_out);                     \
  /* {dc1, dh}; dh1_extra (the exc-conv term of dh1) may be undefined */                                             \
  std::vector<at::Tensor> vjp_inhibit(const at::Tensor& dh1, const at::Tensor& dh1_extra, const at::Tensor& dh,    \
                                      const at::Tensor& dh1_to_dc1, const at::Tensor& dh1_to_dh,                    \
                                      const at::Tensor& dc1_out, const at::Tensor& dh_out);                         \
  at::Tensor vjp_gate_inh(const at::Tensor& dhg, const at::Tensor& dh, const at::Tensor& g1,                        \
                          const at::Tensor& dhg_to_dm1, const at::Tensor& u1_weight, const at::Tensor& out);        \
  /* the FFT conv's channel mix: z (B, X, P, 2), spec (tiles, O, C, 2, kMixLanes) -> (B, Y, P, 2) */               \
  at::Tensor spectral_mix(const at::Tensor& z, const at::Tensor& spec, bool transpose, const at::Tensor& out);     \
  /* the FFT conv's spectrum gradient: p (B, O, P, 2), q (B, C, P, 2), P = M Nh -> S layout (P, 2C, O) */         \
  at::Tensor spectral_outer(const at::Tensor& p, const at::Tensor& q, std::int64_t rows, const at::Tensor& out);

namespace cpu {
CRBP_DECLARE_DEVICE_PASSES
// The instruction set the CPU kernels run with ("avx2" or "base"); chosen on first use from
// the CPU and the environment variable CRBP_FAST_CPU_ISA, and changeable for tests.
const char* isa();
void set_isa(const char* name);
// The tracked step's plane passes (cpu/plane_passes.h): their outputs (undefined where
// the skip mask drops one), then, for a pass with sums, the (B, C, n_sums) float64 sums per plane.
// `in` undefined where None; `scalars` (B, C, n_scalars) in the opmath dtype, or undefined.
std::vector<at::Tensor> plane_pass(int pass, const std::vector<at::Tensor>& in, const at::Tensor& scalars,
                                   std::int64_t skip);
}  // namespace cpu

#ifdef CRBP_WITH_CUDA
namespace cuda {
CRBP_DECLARE_DEVICE_PASSES
// The plane passes on CUDA (float32), as cpu::plane_pass.
std::vector<at::Tensor> plane_pass(int pass, const std::vector<at::Tensor>& in, const at::Tensor& scalars,
                                   std::int64_t skip);
}  // namespace cuda
#endif

#undef CRBP_DECLARE_DEVICE_PASSES

}  // namespace crbp
