// The CPU kernels of the hGRU passes as a table of plain functions on raw pointers.
//
// kernels_impl.h defines them once; kernels_base.cpp compiles them for the baseline ISA and
// kernels_avx2.cpp for AVX2 + FMA, each in its own namespace, and hgru_cpu.cpp picks a table at
// run time. This header is shared by those objects, so it holds only data types and
// declarations: no inline function that two differently-compiled objects could both define.
//
// Layout: every feature map is a contiguous (B, C, H, W) tensor; hw = H * W.
// - Tile kernels see the C channel rows of n <= kTile<T> consecutive pixels of one sample (they
//   need each pixel's channel vector for the 1x1 gates). Their pointers point at
//   (sample b, channel 0, first pixel of the tile); row c is at offset c * hw. Per-sample
//   statistics point at entry (b, 0) of the (B, C) arrays.
// - Plane kernels see n consecutive elements of one (b, c) plane, with that plane's scalars.
#pragma once

#include <cstdint>

#include "plane_passes.h"

namespace crbp::cpu {

// Pixels per tile: 2 KiB of each channel row (512 floats, 256 doubles). A tile pass streams
// C rows of 5 to 8 maps at once; runs this long keep the hardware prefetchers and DRAM pages
// effective (256-byte runs were 1.3 to 1.5x slower), while the (2, C, kTile) scratch still sits
// in L2 (100 KiB at C = 25).
template <typename T>
constexpr std::int64_t kTile = 2048 / sizeof(T);

// Normalisation of one sample's channels: y = weight[c] * (raw - mean[c]) * invstd[c] + bias[c].
// Kind "none" passes mean 0, invstd 1, weight 1, bias 0.
template <typename T>
struct NormView {
  const T* mean;    // (C,) of this sample
  const T* invstd;  // (C,) of this sample
  const T* weight;  // (C,)
  const T* bias;    // (C,)
};

// hg = h * g1, g1 = sigmoid(U1 h + b1); with linearize outputs also g1 and h g1 (1 - g1).
template <typename T>
struct GateInhArgs {
  const T* h;
  T* hg;
  T* g1;          // nullptr: forward only
  T* dhg_to_dm1;  // h * g1 * (1 - g1); nullptr: forward only
  const T* w;     // (C, C) U1
  const T* bias;  // (C,) b1
};

// h1 = sp(x - sp(c1 * (alpha h + mu))), c1 = N(c1_raw), g2 = sigmoid(U2 h1 + b2); with
// linearize outputs also xhat1 and the two coefficients of the inhibition's VJP.
template <typename T>
struct InhibitArgs {
  const T* c1_raw;
  const T* x;
  const T* h;
  T* h1;
  T* g2;
  T* xhat;        // nullptr unless linearizing with a norm
  T* dh1_to_dc1;  // -sigma(r) sigma(q) (alpha h + mu); nullptr: forward only
  T* dh1_to_dh;   // -sigma(r) sigma(q) c1 alpha; nullptr: forward only
  NormView<T> norm;
  const T* alpha;  // (C,)
  const T* mu;     // (C,)
  const T* w;      // (C, C) U2
  const T* bias;   // (C,) b2
};

// F = sp((1 - g2) h + g2 sp(kappa h1 + gamma c2 + omega h1 c2)), c2 = N(c2_raw), on one plane;
// with linearize outputs also xhat2 and the four coefficients of the excitation's VJP.
template <typename T>
struct ExciteMixArgs {
  const T* c2_raw;
  const T* h;
  const T* h1;
  const T* g2;
  T* out;
  T* xhat;      // nullptr unless linearizing with a norm
  T* v_to_dc2;  // nullptr: forward only (then all four are nullptr)
  T* v_to_dh1;
  T* v_to_dm2;
  T* v_to_dh;
  T mean, invstd, weight, bias;  // this plane's normalisation
  T kappa, gamma, omega;         // this plane's channel parameters
};

// dc2 = v v_to_dc2, dh = v v_to_dh, dh1 = v v_to_dh1 + U2^T (v v_to_dm2).
template <typename T>
struct VjpExciteMixArgs {
  const T* v;
  const T* v_to_dc2;
  const T* v_to_dh1;
  const T* v_to_dm2;
  const T* v_to_dh;
  T* dc2;
  T* dh1;
  T* dh;
  const T* w_t;  // (C, C) U2 transposed
};

// d = dh1 (+ dh1_extra); dc1 = d dh1_to_dc1; dh_out = dh + d dh1_to_dh, on one plane.
template <typename T>
struct VjpInhibitArgs {
  const T* dh1;
  const T* dh1_extra;  // nullptr: none
  const T* dh;
  const T* dh1_to_dc1;
  const T* dh1_to_dh;
  T* dc1;
  T* dh_out;
};

// dh_out = dh + dhg g1 + U1^T (dhg dhg_to_dm1).
template <typename T>
struct VjpGateInhArgs {
  const T* dhg;
  const T* dh;
  const T* g1;
  const T* dhg_to_dm1;
  T* dh_out;
  const T* w_t;  // (C, C) U1 transposed
};

// The FFT conv's channel mix on one tile of kMixLanes frequencies (crbp_fast/conv/fft.py,
// spectral_mix): out[b, y, p] = sum_x K[y, x, p] z[b, x, p] (forward, K[o, c] with y = o, x = c)
// or sum_x conj(K[x, y, p]) z[b, x, p] (transpose, y = c, x = o), complex numbers interleaved
// (re, im) in z and out, which are (B, X, P, 2) and (B, Y, P, 2); `spec` points at this tile's
// (O, C, 2, kMixLanes) block of the kernel spectrum (real parts, then imaginary parts).
constexpr std::int64_t kMixLanes = 32;
// Samples whose deinterleaved tile sits in the scratch at once.
constexpr std::int64_t kMixBatch = 8;

template <typename T>
struct SpectralMixArgs {
  const T* z;     // (B, X, P, 2)
  const T* spec;  // (O, C, 2, kMixLanes) of this tile
  T* out;         // (B, Y, P, 2)
  std::int64_t batch, in_ch, out_ch, planes;  // B, X, Y, P
  std::int64_t p0, n;                         // first frequency of the tile, valid ones (<= kMixLanes)
  bool transpose;
};

// The spectrum gradient of the FFT conv on one tile (crbp_fast/conv/fft.py, spectral_outer):
// D[o, c] = sum_b p[b, o, f] conj(q[b, c, f]) for the n frequencies f = p0 + t of the tile,
// p (B, O, P, 2) and q (B, C, P, 2) interleaved, written in the spectrum's own layout
// S (F, 2C, O): frequency f = u Nh + v (rfft2 order) is row v M + u, Re D at column block 0,
// Im D at block 1.
template <typename T>
struct SpectralOuterArgs {
  const T* p;
  const T* q;
  T* d;  // (F, 2C, O)
  std::int64_t batch, out_ch, in_ch, planes;  // B, O, C, P
  std::int64_t rows, cols;                    // M, Nh (P = M Nh)
  std::int64_t p0, n;
};

// Tile kernels take `scratch`: 2 * channels * kTile<T> elements that they may overwrite.
template <typename T>
struct KernelTable {
  const char* isa;
  // Mean and sum of squared deviations of n values, in double.
  void (*moments)(const T* x, std::int64_t n, double* mean, double* m2);
  // Sums of dy and of dy * xhat, in double.
  void (*dot_sums)(const T* dy, const T* xhat, std::int64_t n, double* sum_dy, double* sum_dy_xhat);
  // y = weight * (x - mean) * invstd + bias.
  void (*normalize)(const T* x, T* y, std::int64_t n, T mean, T invstd, T weight, T bias);
  // dx = a dy + b + c xhat (the normalisation's VJP once its statistics are reduced).
  void (*norm_vjp_apply)(const T* dy, const T* xhat, T* dx, std::int64_t n, T a, T b, T c);
  void (*gate_inh)(const GateInhArgs<T>& a, std::int64_t channels, std::int64_t hw, std::int64_t n, T* scratch);
  void (*inhibit)(const InhibitArgs<T>& a, std::int64_t channels, std::int64_t hw, std::int64_t n, T* scratch);
  void (*excite_mix)(const ExciteMixArgs<T>& a, std::int64_t n);
  void (*vjp_excite_mix)(const VjpExciteMixArgs<T>& a, std::int64_t channels, std::int64_t hw, std::int64_t n,
                         T* scratch);
  void (*vjp_inhibit)(const VjpInhibitArgs<T>& a, std::int64_t n);
  void (*vjp_gate_inh)(const VjpGateInhArgs<T>& a, std::int64_t channels, std::int64_t hw, std::int64_t n,
                       T* scratch);
  // scratch: 2 * kMixLanes * (min(B, kMixBatch) * X + kMixBatch) elements.
  void (*spectral_mix)(const SpectralMixArgs<T>& a, T* scratch);
  // scratch: 2 * kMixLanes * min(B, kMixBatch) * (O + C) elements.
  void (*spectral_outer)(const SpectralOuterArgs<T>& a, T* scratch);
  // The tracked step's plane passes (plane_passes.h), indexed by PlanePass.
  void (*plane[kPlanePasses])(const PlaneArgs<T>& a);
};

namespace base {
template <typename T>
const KernelTable<T>& kernel_table();
}
namespace avx2 {
template <typename T>
const KernelTable<T>& kernel_table();
}
namespace avx512 {
template <typename T>
const KernelTable<T>& kernel_table();
}

}  // namespace crbp::cpu
