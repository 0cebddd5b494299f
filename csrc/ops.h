// The validated entry points of the extension: what bindings.cpp exposes to Python as
// crbp_fast.hgru.native._C and what the C++ tests call. Each checks every argument with TORCH_CHECK
// (device, dtype, contiguity, shape) and runs the CPU or CUDA implementation of hgru.h.
//
// A normalisation is passed flat, as reference.NormSpec's fields: kind ("batch", "group" or
// "none"), weight and bias ((C,) in the opmath dtype; None for "none"), eps, groups.
// Statistics (mean, invstd) are (B, C) in the opmath dtype (float64 for float64 maps, else
// float32).
//
// Optional `out` buffers let the step and the VJP reuse their own temporaries instead of
// allocating (a fresh 9 MB output costs more than the pass that fills it). Each may be exactly
// the input named in its comment (the kernel reads each element of that input before writing
// the same element) and must not overlap any other argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace crbp::ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool with_cuda();
std::string cpu_isa();
void set_cpu_isa(const std::string& name);

std::tuple<Tensor, Tensor> norm_stats(const Tensor& c, const std::string& kind, std::int64_t groups, double eps);
Tensor normalize(const Tensor& c, const std::string& kind, const OptTensor& weight, const OptTensor& bias,
                 double eps, std::int64_t groups);
// out may be dy.
Tensor norm_vjp(const Tensor& dy, const OptTensor& xhat, const OptTensor& invstd, const std::string& kind,
                const OptTensor& weight, std::int64_t groups, const OptTensor& out);

Tensor gate_inh(const Tensor& h, const Tensor& u1_weight, const Tensor& u1_bias);
// h1_out may be c1_raw; g2_out may not be an input.
std::tuple<Tensor, Tensor> inhibit(const Tensor& c1_raw, const Tensor& x, const Tensor& h, const std::string& kind,
                                   const OptTensor& norm_weight, const OptTensor& norm_bias, double eps,
                                   std::int64_t groups, const Tensor& alpha, const Tensor& mu,
                                   const Tensor& u2_weight, const Tensor& u2_bias, const OptTensor& h1_out,
                                   const OptTensor& g2_out);
// out may be c2_raw.
Tensor excite_mix(const Tensor& c2_raw, const Tensor& h, const Tensor& h1, const Tensor& g2, const std::string& kind,
                  const OptTensor& norm_weight, const OptTensor& norm_bias, double eps, std::int64_t groups,
                  const Tensor& kappa, const Tensor& gamma, const Tensor& omega, const OptTensor& out);

// The forward passes that also return the factors of the VJP (see hgru.h for the order).
std::vector<Tensor> linearize_gate_inh(const Tensor& h, const Tensor& u1_weight, const Tensor& u1_bias);
std::vector<OptTensor> linearize_inhibit(const Tensor& c1_raw, const Tensor& x, const Tensor& h,
                                         const std::string& kind, const OptTensor& norm_weight,
                                         const OptTensor& norm_bias, double eps, std::int64_t groups,
                                         const Tensor& alpha, const Tensor& mu, const Tensor& u2_weight,
                                         const Tensor& u2_bias);
std::vector<OptTensor> linearize_excite_mix(const Tensor& c2_raw, const Tensor& h, const Tensor& h1,
                                            const Tensor& g2, const std::string& kind,
                                            const OptTensor& norm_weight, const OptTensor& norm_bias, double eps,
                                            std::int64_t groups, const Tensor& kappa, const Tensor& gamma,
                                            const Tensor& omega);

// dc2_out and dh1_out may not be inputs (a linearisation's workspace, reused by every VJP).
std::tuple<Tensor, Tensor, Tensor> vjp_excite_mix(const Tensor& v, const Tensor& v_to_dc2, const Tensor& v_to_dh1,
                                                  const Tensor& v_to_dm2, const Tensor& v_to_dh,
                                                  const Tensor& u2_weight, const OptTensor& dc2_out,
                                                  const OptTensor& dh1_out);
// dc1_out may be dh1; dh_out may be dh.
std::tuple<Tensor, Tensor> vjp_inhibit(const Tensor& dh1, const OptTensor& dh1_extra, const Tensor& dh,
                                       const Tensor& dh1_to_dc1, const Tensor& dh1_to_dh, const OptTensor& dc1_out,
                                       const OptTensor& dh_out);
// out may be dh.
Tensor vjp_gate_inh(const Tensor& dhg, const Tensor& dh, const Tensor& g1, const Tensor& dhg_to_dm1,
                    const Tensor& u1_weight, const OptTensor& out);

// The FFT conv's channel mix (crbp_fast/conv/fft.py, spectral_mix): z (B, X, P, 2), the real
// view of a complex (B, X, P) spectrum; spec (ceil(P / 32), O, C, 2, 32) in z's dtype (float32
// or float64), the kernel spectrum K[o, c, p] in tiles of 32 frequencies. Returns (B, O, P, 2)
// = sum_c K[o, c] z[b, c] (X = C), or with transpose (B, C, P, 2) = sum_o conj(K[o, c]) z[b, o]
// (X = O). out, if given, must not overlap z or spec.
Tensor spectral_mix(const Tensor& z, const Tensor& spec, bool transpose, const OptTensor& out);
// The FFT conv's spectrum gradient (crbp_fast/conv/fft.py, spectral_outer): p (B, O, P, 2) and
// q (B, C, P, 2), real views of complex (B, X, M, Nh) rfft2 outputs of one dtype (P = M Nh,
// rows = M); returns D[o, c] = sum_b p[b, o] conj(q[b, c]) per frequency in the spectrum's
// layout S (P, 2C, O): frequency u Nh + v at row v M + u, Re D in columns [0, C), Im D in [C, 2C).
// out, if given (every element is written), must not overlap p or q.
Tensor spectral_outer(const Tensor& p, const Tensor& q, std::int64_t rows, const OptTensor& out);

// One of the tracked step's plane passes (cpu/plane_passes.h) by name: `in` in the pass's order
// (None only where the pass allows it), `scalars` (B, C, n_scalars) per plane in the opmath dtype
// (None for a pass without), `skip` a mask of outputs not to compute. Returns the outputs (None
// where skipped), then for a pass with sums the (B, C, n_sums) float64 sums per plane. CPU
// (float32, float64) and CUDA (float32).
std::vector<OptTensor> plane_pass(const std::string& name, const std::vector<OptTensor>& in,
                                  const OptTensor& scalars, std::int64_t skip);

}  // namespace crbp::ops
