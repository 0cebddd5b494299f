// The CPU kernels of the hGRU passes, written once and compiled per ISA.
//
// The including file defines CRBP_ISA (a namespace name) and, for a non-baseline ISA, a target
// pragma. Everything here except kernel_table<T>() lives in an anonymous namespace, and nothing
// from the standard library with external linkage is used, so two objects compiled for
// different ISAs share no function: the linker cannot swap an AVX2 copy into baseline code.
//
// The math of each pass is documented in crbp_fast/hgru/reference.py; the argument structs in
// kernel_table.h say which buffers each kernel reads and writes. Loops over pixels carry
// `#pragma omp simd` (the build passes -fopenmp), which also lets the double-precision
// reductions be reassociated into SIMD lanes.
#ifndef CRBP_ISA
#error "define CRBP_ISA (the namespace of this ISA's kernels) before including kernels_impl.h"
#endif

#include <cstdint>
#include <tuple>

#include "kernel_table.h"

#define CRBP_STR_(x) #x
#define CRBP_STR(x) CRBP_STR_(x)

namespace crbp::cpu::CRBP_ISA {
namespace {

#include "simd_math.h"

using std::int64_t;

// Copies the C rows of n pixels (stride hw) into a (C, kTile) block, zero-padded past n, so that
// the channel mix below runs on full tiles.
template <typename T>
inline void load_rows(const T* src, int64_t channels, int64_t hw, int64_t n, T* rows) {
  constexpr int64_t K = kTile<T>;
  for (int64_t c = 0; c < channels; ++c) {
    const T* s = src + c * hw;
    T* r = rows + c * K;
    for (int64_t t = 0; t < n; ++t) r[t] = s[t];
    for (int64_t t = n; t < K; ++t) r[t] = T(0);
  }
}

template <typename T>
inline void zero_tail(T* row, int64_t n) {
  for (int64_t t = n; t < kTile<T>; ++t) row[t] = T(0);
}

// SIMD vectors of CRBP_SIMD_BYTES (32 unless the including file says otherwise) through GCC /
// Clang vector extensions: AVX-512 registers in the AVX-512 object (64 bytes), AVX2 registers in
// the AVX2 one, pairs of SSE2 / NEON registers in the baseline one.
#ifndef CRBP_SIMD_BYTES
#define CRBP_SIMD_BYTES 32
#endif
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(CRBP_SIMD_BYTES)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(CRBP_SIMD_BYTES)));
};

// Vectors by reference rather than by value: passing a 32-byte vector by value changes the ABI
// of the baseline object (GCC's -Wpsabi note), even though everything here is inlined.
template <typename V, typename T>
inline void load_v(V& v, const T* p) {
  __builtin_memcpy(&v, p, sizeof(V));
}

template <typename V, typename T>
inline void store_v(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// The 1x1 conv of a tile: out[o][t] = bias[o] + sum_c w[o][c] rows[c][t] (bias may be null), for
// all o < C and t < kTile, rows and out being (C, kTile) blocks. Register-blocked: 4 output
// channels x 2 vectors of pixels accumulate in 8 registers while the input channels stream by,
// 2 loads and 4 broadcasts feeding 8 FMAs.
template <typename T>
inline void mix_tile(const T* rows, const T* w, const T* bias, int64_t channels, T* out) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  constexpr int64_t K = kTile<T>;
  static_assert(K % (2 * L) == 0, "a tile is a whole number of vector pairs");
  int64_t o = 0;
  for (; o + 4 <= channels; o += 4) {
    const T* w0 = w + o * channels;
    const T* w1 = w0 + channels;
    const T* w2 = w1 + channels;
    const T* w3 = w2 + channels;
    const T b0 = bias ? bias[o] : T(0), b1 = bias ? bias[o + 1] : T(0);
    const T b2 = bias ? bias[o + 2] : T(0), b3 = bias ? bias[o + 3] : T(0);
    for (int64_t t = 0; t < K; t += 2 * L) {
      V a0 = V{} + b0, a1 = a0, c0 = V{} + b1, c1 = c0, d0 = V{} + b2, d1 = d0, e0 = V{} + b3, e1 = e0;
      for (int64_t c = 0; c < channels; ++c) {
        V x0, x1;
        load_v(x0, rows + c * K + t);
        load_v(x1, rows + c * K + t + L);
        const T s0 = w0[c], s1 = w1[c], s2 = w2[c], s3 = w3[c];
        a0 += s0 * x0;
        a1 += s0 * x1;
        c0 += s1 * x0;
        c1 += s1 * x1;
        d0 += s2 * x0;
        d1 += s2 * x1;
        e0 += s3 * x0;
        e1 += s3 * x1;
      }
      T* po = out + o * K + t;
      store_v(po, a0);
      store_v(po + L, a1);
      store_v(po + K, c0);
      store_v(po + K + L, c1);
      store_v(po + 2 * K, d0);
      store_v(po + 2 * K + L, d1);
      store_v(po + 3 * K, e0);
      store_v(po + 3 * K + L, e1);
    }
  }
  for (; o < channels; ++o) {
    const T* wo = w + o * channels;
    const T bo = bias ? bias[o] : T(0);
    for (int64_t t = 0; t < K; t += 2 * L) {
      V a0 = V{} + bo, a1 = a0;
      for (int64_t c = 0; c < channels; ++c) {
        V x0, x1;
        load_v(x0, rows + c * K + t);
        load_v(x1, rows + c * K + t + L);
        a0 += wo[c] * x0;
        a1 += wo[c] * x1;
      }
      store_v(out + o * K + t, a0);
      store_v(out + o * K + t + L, a1);
    }
  }
}

// --------------------------------------------------------------------------------------------
// Normalisation statistics and applies (per plane or plane chunk)

template <typename T>
void moments(const T* x, int64_t n, double* mean, double* m2) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]);
  const double m = s / static_cast<double>(n);
  double q = 0;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - m;
    q += d * d;
  }
  *mean = m;
  *m2 = q;
}

template <typename T>
void dot_sums(const T* dy, const T* xhat, int64_t n, double* sum_dy, double* sum_dy_xhat) {
  double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(dy[i]);
    s1 += d;
    s2 += d * static_cast<double>(xhat[i]);
  }
  *sum_dy = s1;
  *sum_dy_xhat = s2;
}

template <typename T>
void normalize(const T* x, T* y, int64_t n, T mean, T invstd, T weight, T bias) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = weight * ((x[i] - mean) * invstd) + bias;
}

template <typename T>
void norm_vjp_apply(const T* dy, const T* xhat, T* dx, int64_t n, T a, T b, T c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = a * dy[i] + b + c * xhat[i];
}

// --------------------------------------------------------------------------------------------
// Forward and linearize passes

template <typename T>
void gate_inh(const GateInhArgs<T>& a, int64_t channels, int64_t hw, int64_t n, T* scratch) {
  constexpr int64_t K = kTile<T>;
  T* mixed = scratch + channels * K;
  load_rows(a.h, channels, hw, n, scratch);
  mix_tile(scratch, a.w, a.bias, channels, mixed);
  for (int64_t o = 0; o < channels; ++o) {
    const T* acc = mixed + o * K;
    const T* h = scratch + o * K;
    T* hg = a.hg + o * hw;
    if (a.g1 == nullptr) {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) hg[t] = h[t] * sigmoid(acc[t]);
    } else {
      T* g1 = a.g1 + o * hw;
      T* slope = a.dhg_to_dm1 + o * hw;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) {
        const T g = sigmoid(acc[t]);
        hg[t] = h[t] * g;
        g1[t] = g;
        slope[t] = h[t] * g * (T(1) - g);
      }
    }
  }
}

template <typename T>
void inhibit(const InhibitArgs<T>& a, int64_t channels, int64_t hw, int64_t n, T* scratch) {
  constexpr int64_t K = kTile<T>;
  for (int64_t c = 0; c < channels; ++c) {
    const T mean = a.norm.mean[c], invstd = a.norm.invstd[c];
    const T nw = a.norm.weight[c], nb = a.norm.bias[c];
    const T alpha = a.alpha[c], mu = a.mu[c];
    const int64_t off = c * hw;
    const T* raw = a.c1_raw + off;
    const T* x = a.x + off;
    const T* h = a.h + off;
    T* h1 = a.h1 + off;
    T* row = scratch + c * K;  // h1 of the tile: the input of the U2 gate
    if (a.dh1_to_dc1 == nullptr) {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) {
        const T c1 = nw * ((raw[t] - mean) * invstd) + nb;
        const T q = c1 * (alpha * h[t] + mu);
        const T v = softplus(x[t] - softplus(q));
        h1[t] = v;
        row[t] = v;
      }
    } else {
      T* dc1 = a.dh1_to_dc1 + off;
      T* dh = a.dh1_to_dh + off;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) {
        const T c1 = nw * ((raw[t] - mean) * invstd) + nb;
        const T gate = alpha * h[t] + mu;
        const T q = c1 * gate;
        T sp_q, sig_q, v, sig_r;
        softplus_sigmoid(q, sp_q, sig_q);
        softplus_sigmoid(x[t] - sp_q, v, sig_r);
        const T k = -sig_r * sig_q;
        h1[t] = v;
        row[t] = v;
        dc1[t] = k * gate;
        dh[t] = k * c1 * alpha;
      }
      if (a.xhat != nullptr) {
        T* xhat = a.xhat + off;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) xhat[t] = (raw[t] - mean) * invstd;
      }
    }
    zero_tail(row, n);
  }
  T* mixed = scratch + channels * K;
  mix_tile(scratch, a.w, a.bias, channels, mixed);
  for (int64_t o = 0; o < channels; ++o) {
    const T* acc = mixed + o * K;
    T* g2 = a.g2 + o * hw;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) g2[t] = sigmoid(acc[t]);
  }
}

template <typename T>
void excite_mix(const ExciteMixArgs<T>& a, int64_t n) {
  const T mean = a.mean, invstd = a.invstd, nw = a.weight, nb = a.bias;
  const T kappa = a.kappa, gamma = a.gamma, omega = a.omega;
  const T* raw = a.c2_raw;
  const T* h = a.h;
  const T* h1 = a.h1;
  const T* g2 = a.g2;
  T* out = a.out;
  if (a.v_to_dc2 == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T c2 = nw * ((raw[i] - mean) * invstd) + nb;
      const T e = kappa * h1[i] + gamma * c2 + omega * h1[i] * c2;
      const T z = (T(1) - g2[i]) * h[i] + g2[i] * softplus(e);
      out[i] = softplus(z);
    }
    return;
  }
  T* k_c2 = a.v_to_dc2;
  T* k_h1 = a.v_to_dh1;
  T* k_m2 = a.v_to_dm2;
  T* k_h = a.v_to_dh;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T c2 = nw * ((raw[i] - mean) * invstd) + nb;
    const T e = kappa * h1[i] + gamma * c2 + omega * h1[i] * c2;
    T hh, sig_e, f, sig_z;
    softplus_sigmoid(e, hh, sig_e);
    const T g = g2[i];
    softplus_sigmoid((T(1) - g) * h[i] + g * hh, f, sig_z);
    out[i] = f;
    const T de = sig_z * g * sig_e;  // dL/de per unit v
    k_c2[i] = de * (gamma + omega * h1[i]);
    k_h1[i] = de * (kappa + omega * c2);
    k_m2[i] = sig_z * (hh - h[i]) * g * (T(1) - g);
    k_h[i] = sig_z * (T(1) - g);
  }
  if (a.xhat != nullptr) {
    T* xhat = a.xhat;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) xhat[i] = (raw[i] - mean) * invstd;
  }
}

// --------------------------------------------------------------------------------------------
// VJP passes

template <typename T>
void vjp_excite_mix(const VjpExciteMixArgs<T>& a, int64_t channels, int64_t hw, int64_t n, T* scratch) {
  constexpr int64_t K = kTile<T>;
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t off = c * hw;
    const T* v = a.v + off;
    const T* k_c2 = a.v_to_dc2 + off;
    const T* k_m2 = a.v_to_dm2 + off;
    const T* k_h = a.v_to_dh + off;
    T* dc2 = a.dc2 + off;
    T* dh = a.dh + off;
    T* row = scratch + c * K;  // dL/dm2, the input of U2^T
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      const T vv = v[t];
      dc2[t] = vv * k_c2[t];
      dh[t] = vv * k_h[t];
      row[t] = vv * k_m2[t];
    }
    zero_tail(row, n);
  }
  T* mixed = scratch + channels * K;
  mix_tile(scratch, a.w_t, static_cast<const T*>(nullptr), channels, mixed);
  for (int64_t o = 0; o < channels; ++o) {
    const T* acc = mixed + o * K;
    const int64_t off = o * hw;
    const T* v = a.v + off;
    const T* k_h1 = a.v_to_dh1 + off;
    T* dh1 = a.dh1 + off;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) dh1[t] = v[t] * k_h1[t] + acc[t];
  }
}

template <typename T>
void vjp_inhibit(const VjpInhibitArgs<T>& a, int64_t n) {
  const T* dh1 = a.dh1;
  const T* extra = a.dh1_extra;
  const T* dh = a.dh;
  const T* k_c1 = a.dh1_to_dc1;
  const T* k_h = a.dh1_to_dh;
  T* dc1 = a.dc1;
  T* dh_out = a.dh_out;
  if (extra == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T d = dh1[i];
      dc1[i] = d * k_c1[i];
      dh_out[i] = dh[i] + d * k_h[i];
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T d = dh1[i] + extra[i];
      dc1[i] = d * k_c1[i];
      dh_out[i] = dh[i] + d * k_h[i];
    }
  }
}

template <typename T>
void vjp_gate_inh(const VjpGateInhArgs<T>& a, int64_t channels, int64_t hw, int64_t n, T* scratch) {
  constexpr int64_t K = kTile<T>;
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t off = c * hw;
    const T* dhg = a.dhg + off;
    const T* slope = a.dhg_to_dm1 + off;
    T* row = scratch + c * K;  // dL/dm1, the input of U1^T
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) row[t] = dhg[t] * slope[t];
    zero_tail(row, n);
  }
  T* mixed = scratch + channels * K;
  mix_tile(scratch, a.w_t, static_cast<const T*>(nullptr), channels, mixed);
  for (int64_t o = 0; o < channels; ++o) {
    const T* acc = mixed + o * K;
    const int64_t off = o * hw;
    const T* dhg = a.dhg + off;
    const T* dh = a.dh + off;
    const T* g1 = a.g1 + off;
    T* out = a.dh_out + off;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) out[t] = dh[t] + dhg[t] * g1[t] + acc[t];
  }
}

// Software prefetch of one tile row (2 kMixLanes values) for a read (RW 0) or a write (RW 1);
// a prefetch past the end of a tensor cannot fault.
template <typename T, int RW>
inline void prefetch_row(const T* row) {
  const char* line = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < static_cast<int64_t>(2 * kMixLanes * sizeof(T)); b += 64) __builtin_prefetch(line + b, RW, 3);
}

// One output channel of NB samples over NV SIMD vectors of a tile's lanes (starting at vector
// v0), the complex accumulators held in registers across the whole sum over input channels:
// acc[b] += K z[b] (CONJ false) or conj(K) z[b] (CONJ true). `zs` is the deinterleaved tile,
// (samples, X, 2, kMixLanes); `k` the spectrum block of this output channel, input channel x at
// k + x * stride_x; `acc` receives (NB, 2, kMixLanes). NB * NV <= 4 keeps the 2 NB NV
// accumulators, the kernel pair and the input pair in 12 of AVX2's 16 registers (NB * NV <= 8:
// 22 of AVX-512's 32); per input channel that is 2 NV + 2 NB NV loads against 4 NB NV FMAs (the
// old form, one sample at a time with its accumulators in memory, did three loads and a store
// per FMA pair and ran at about a third of the machine's GEMM rate).
template <typename T, bool CONJ, int NB, int NV>
inline void mix_block(const T* zs, int64_t nx, const T* k, int64_t stride_x, int64_t v0, T* acc,
                      const T* prefetch) {
  using V = typename Simd<T>::V;
  constexpr int64_t VL = static_cast<int64_t>(sizeof(V) / sizeof(T));
  constexpr int64_t L = kMixLanes;
  V ar[NB][NV], ai[NB][NV];
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < NV; ++v) ar[b][v] = ai[b][v] = V{};
  const int64_t off = v0 * VL;
  for (int64_t x = 0; x < nx; ++x) {
    const T* kx = k + x * stride_x + off;
    if (prefetch != nullptr) {
      // The next output channel's (2, kMixLanes) block of this input channel, one line at a time.
      prefetch_row<T, 0>(prefetch + x * stride_x);
    }
    for (int v = 0; v < NV; ++v) {
      V kr, ki;
      load_v(kr, kx + v * VL);
      load_v(ki, kx + L + v * VL);
      for (int b = 0; b < NB; ++b) {
        const T* z = zs + (b * nx + x) * 2 * L + off + v * VL;
        V zr, zi;
        load_v(zr, z);
        load_v(zi, z + L);
        // One product per statement, so that each contracts into one FMA on the accumulator.
        ar[b][v] += kr * zr;
        ai[b][v] += kr * zi;
        if (CONJ) {
          ar[b][v] += ki * zi;
          ai[b][v] -= ki * zr;
        } else {
          ar[b][v] -= ki * zi;
          ai[b][v] += ki * zr;
        }
      }
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < NV; ++v) {
      store_v(acc + b * 2 * L + off + v * VL, ar[b][v]);
      store_v(acc + b * 2 * L + L + off + v * VL, ai[b][v]);
    }
}

// mix_block over all the vectors of a tile for nb (1..4) samples.
// `prefetch` (or null): the kernel block to be read next, fetched during the first pass.
template <typename T, bool CONJ, int NB>
inline void mix_samples(const T* zs, int64_t nx, const T* k, int64_t stride_x, T* acc, const T* prefetch) {
  using V = typename Simd<T>::V;
  constexpr int64_t vectors = kMixLanes / static_cast<int64_t>(sizeof(V) / sizeof(T));
  // Accumulator pairs per block: 4 with 16 vector registers, 8 with AVX-512's 32.
  constexpr int pairs = CRBP_SIMD_BYTES >= 64 ? 8 : 4;
  constexpr int NV = pairs / NB < vectors ? pairs / NB : static_cast<int>(vectors);
  static_assert(vectors % NV == 0, "a tile is a whole number of vector blocks");
  for (int64_t v0 = 0; v0 < vectors; v0 += NV)
    mix_block<T, CONJ, NB, NV>(zs, nx, k, stride_x, v0, acc, v0 == 0 ? prefetch : nullptr);
}

// Copies n interleaved complex values into planar (re, im) rows of kMixLanes, zero past n.
template <typename T>
inline void deinterleave(const T* src, int64_t n, T* re, T* im) {
  for (int64_t t = 0; t < n; ++t) {
    re[t] = src[2 * t];
    im[t] = src[2 * t + 1];
  }
  for (int64_t t = n; t < kMixLanes; ++t) re[t] = im[t] = T(0);
}

template <typename T, bool CONJ>
inline void spectral_mix_impl(const SpectralMixArgs<T>& a, T* scratch) {
  constexpr int64_t L = kMixLanes;
  const int64_t nx = a.in_ch, ny = a.out_ch;
  // K[o, c] blocks: forward reads K[y, x] (C = X), transpose K[x, y] (C = Y).
  const int64_t stride_y = CONJ ? 2 * L : nx * 2 * L;
  const int64_t stride_x = CONJ ? ny * 2 * L : 2 * L;
  for (int64_t b0 = 0; b0 < a.batch; b0 += kMixBatch) {
    const int64_t nb = a.batch - b0 < kMixBatch ? a.batch - b0 : kMixBatch;
    // Deinterleave the tile of every (sample, input channel), zero past n.
    for (int64_t bb = 0; bb < nb; ++bb) {
      for (int64_t x = 0; x < nx; ++x) {
        T* zr = scratch + (bb * nx + x) * 2 * L;
        deinterleave(a.z + (((b0 + bb) * nx + x) * a.planes + a.p0) * 2, a.n, zr, zr + L);
      }
    }
    T* acc = scratch + nb * nx * 2 * L;
    // The tile's rows are nb * (nx + ny) strided rows of 2 L values, more streams than the
    // hardware prefetchers follow: the next tile's rows (2 L values on) are fetched in slices
    // while this tile computes, reads first, each output row once it is written.
    const int64_t rows = nb * nx, next_tile = 2 * L;
    for (int64_t y = 0; y < ny; ++y) {
      for (int64_t r = y * rows / ny; r < (y + 1) * rows / ny; ++r) {
        const T* src = a.z + ((b0 * nx + r) * a.planes + a.p0) * 2 + next_tile;
        prefetch_row<T, 0>(src);
      }
      const T* k = a.spec + y * stride_y;
      // The spectrum streams from memory once per tile; without a prefetch of the next output
      // channel's blocks the loop waited on memory latency (about 3x its arithmetic time). The
      // last channel fetches the next tile's first one (a prefetch past the end cannot fault).
      const T* next = y + 1 < ny ? k + stride_y : a.spec + nx * ny * 2 * L;
      // Register blocks of up to 4 samples (the kernel block is re-read from L1 per block).
      for (int64_t s0 = 0; s0 < nb; s0 += 4) {
        const T* zs = scratch + s0 * nx * 2 * L;
        T* as = acc + s0 * 2 * L;
        const T* pf = s0 == 0 && b0 == 0 ? next : nullptr;
        switch (nb - s0 < 4 ? nb - s0 : 4) {
          case 1: mix_samples<T, CONJ, 1>(zs, nx, k, stride_x, as, pf); break;
          case 2: mix_samples<T, CONJ, 2>(zs, nx, k, stride_x, as, pf); break;
          case 3: mix_samples<T, CONJ, 3>(zs, nx, k, stride_x, as, pf); break;
          default: mix_samples<T, CONJ, 4>(zs, nx, k, stride_x, as, pf); break;
        }
      }
      for (int64_t bb = 0; bb < nb; ++bb) {
        T* dst = a.out + (((b0 + bb) * ny + y) * a.planes + a.p0) * 2;
        const T* ar = acc + bb * 2 * L;
        const T* ai = ar + L;
        for (int64_t t = 0; t < a.n; ++t) {
          dst[2 * t] = ar[t];
          dst[2 * t + 1] = ai[t];
        }
        prefetch_row<T, 1>(dst + next_tile);
      }
    }
  }
}

template <typename T>
void spectral_mix(const SpectralMixArgs<T>& a, T* scratch) {
  if (a.transpose) {
    spectral_mix_impl<T, true>(a, scratch);
  } else {
    spectral_mix_impl<T, false>(a, scratch);
  }
}

// The spectrum gradient of one tile. Each frequency's (2, C, O) block of S is one contiguous run
// of memory, so the kernel works frequency by frequency with the output channel o in the SIMD
// lanes: p is transposed into the scratch as (samples, lanes, 2, O) rows, q deinterleaved as
// (samples, C, 2, lanes), and D[c, :] of a frequency is a rank-B update of one contiguous row
// written once (the former form, the tile's frequencies in the lanes, scattered every value of
// S to its own row and ran at about 8x the time of this one's stream of S).
template <typename T>
void spectral_outer(const SpectralOuterArgs<T>& a, T* scratch) {
  constexpr int64_t L = kMixLanes;
  const int64_t no = a.out_ch, nc = a.in_ch;
  for (int64_t b0 = 0; b0 < a.batch; b0 += kMixBatch) {
    const int64_t nb = a.batch - b0 < kMixBatch ? a.batch - b0 : kMixBatch;
    T* ps = scratch;                    // (nb, L, 2, O)
    T* qs = scratch + nb * no * 2 * L;  // (nb, C, 2, L)
    for (int64_t bb = 0; bb < nb; ++bb) {
      for (int64_t o = 0; o < no; ++o) {
        const T* src = a.p + (((b0 + bb) * no + o) * a.planes + a.p0) * 2;
        T* dst = ps + bb * L * 2 * no + o;
        for (int64_t t = 0; t < a.n; ++t) {
          dst[t * 2 * no] = src[2 * t];
          dst[t * 2 * no + no] = src[2 * t + 1];
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        T* r = qs + (bb * nc + c) * 2 * L;
        deinterleave(a.q + (((b0 + bb) * nc + c) * a.planes + a.p0) * 2, a.n, r, r + L);
      }
    }
    for (int64_t t = 0; t < a.n; ++t) {
      // Frequency f = u Nh + v (rfft2 order) is row v M + u of S.
      const int64_t f = a.p0 + t;
      T* dre = a.d + ((f % a.cols) * a.rows + f / a.cols) * 2 * nc * no;
      T* dim = dre + nc * no;
      for (int64_t c = 0; c < nc; ++c) {
        T* ore = dre + c * no;
        T* oim = dim + c * no;
        if (b0 == 0) {
#pragma omp simd
          for (int64_t o = 0; o < no; ++o) ore[o] = oim[o] = T(0);
        }
        for (int64_t bb = 0; bb < nb; ++bb) {
          const T* pr = ps + (bb * L + t) * 2 * no;
          const T* pi = pr + no;
          const T qr = qs[(bb * nc + c) * 2 * L + t], qi = qs[(bb * nc + c) * 2 * L + L + t];
          // D += p conj(q): one product per statement (one FMA each).
#pragma omp simd
          for (int64_t o = 0; o < no; ++o) {
            T re = ore[o], im = oim[o];
            re += pr[o] * qr;
            re += pi[o] * qi;
            im += pi[o] * qr;
            im -= pr[o] * qi;
            ore[o] = re;
            oim[o] = im;
          }
        }
      }
    }
  }
}

#include "plane_impl.h"

// The plane passes' kernels in plane_passes.h's order.
#define CRBP_PLANE_KERNELS(T)                                                                              \
  &plane_dot<T>, &tangent_gate_inh<T>, &tangent_inhibit<T>, &tangent_excite_mix<T>, &norm_vjp_tangent<T>,  \
      &tangent_vjp_inhibit<T>, &tangent_vjp_gate_inh<T>, &tracked_inhibit<T>, &tracked_excite_mix<T>,     \
      &column_sums_excite_mix<T>, &column_sums_inhibit<T>, &step_vjp_excite_mix<T>, &step_vjp_inhibit<T>, \
      &native_factors<T>

template <typename T>
constexpr KernelTable<T> kTable{
    CRBP_STR(CRBP_ISA), &moments<T>,       &dot_sums<T>,    &normalize<T>,      &norm_vjp_apply<T>,
    &gate_inh<T>,       &inhibit<T>,       &excite_mix<T>,  &vjp_excite_mix<T>, &vjp_inhibit<T>,
    &vjp_gate_inh<T>,   &spectral_mix<T>,  &spectral_outer<T>,
    {CRBP_PLANE_KERNELS(T)},
};

// Every pass of plane_passes.h has its kernel here (a row added there and not here would leave a
// trailing entry null): the list's length, checked at compile time (an unevaluated count, so it
// holds in every build, sanitizers included).
static_assert(std::tuple_size_v<decltype(std::make_tuple(CRBP_PLANE_KERNELS(float)))> == kPlanePasses,
              "kernels_impl.h: the plane-pass table lacks a kernel for a pass of plane_passes.h");
#undef CRBP_PLANE_KERNELS

}  // namespace

template <typename T>
const KernelTable<T>& kernel_table() {
  return kTable<T>;
}

template const KernelTable<float>& kernel_table<float>();
template const KernelTable<double>& kernel_table<double>();

}  // namespace crbp::cpu::CRBP_ISA

#undef CRBP_STR
#undef CRBP_STR_
