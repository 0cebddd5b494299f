// CUDA implementation of the hGRU passes (hgru.h): float32 or bfloat16 storage, float32
// arithmetic. Arguments are validated by ops.cpp.
//
// Kernel shapes:
// - pixel kernels (the passes with a 1x1 gate): one thread per pixel of one sample, the block's
//   channel vectors staged in shared memory as [channel][thread] (conflict-free), the (C, C)
//   gate matrix beside them; reads and writes of each channel row are coalesced;
// - plane kernels (elementwise passes): blockIdx.y walks the (b, c) planes, so per-plane
//   scalars are loaded once per block and no element needs an index division;
// - normalisation: per-plane mean and centred sum of squares (one block per plane, two passes
//   over the plane), combined per reduction set by Chan et al.'s update in a tiny per-(b, c)
//   kernel, then applied inside the pass that consumes the conv output. The VJP reduces the
//   per-plane sums of dy and dy * xhat the same way.
//
// No pointer is __restrict__: the `out` buffers of ops.h may alias an input (each thread reads
// its element of that input before it writes the same element).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#include "../cpu/plane_passes.h"
#include "../hgru.h"

namespace crbp::cuda {
namespace {

using at::Tensor;
using std::int64_t;

#define CRBP_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int kThreads = 256;       // plane and reduction kernels
constexpr int kPixelThreads = 128;  // pixel kernels
constexpr int kMaxGridY = 65535;

// ---------------------------------------------------------------------------------------------
// Device helpers

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
  return static_cast<float>(*p);
}

template <typename T>
__device__ __forceinline__ void st(T* p, float v) {
  *p = static_cast<T>(v);
}

// Stable forms: one exp of a non-positive argument. softplus is x above 20, as
// torch.nn.functional.softplus.
__device__ __forceinline__ void softplus_sigmoid(float x, float& sp, float& sig) {
  const float t = expf(-fabsf(x));
  const float d = 1.0f / (1.0f + t);
  sig = x >= 0.0f ? d : t * d;
  sp = x > 20.0f ? x : fmaxf(x, 0.0f) + log1pf(t);
}

__device__ __forceinline__ float sigmoid(float x) {
  const float t = expf(-fabsf(x));
  const float d = 1.0f / (1.0f + t);
  return x >= 0.0f ? d : t * d;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
template <typename V>
__device__ V block_sum(V v) {
  __shared__ V partial[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? partial[lane] : V(0);
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  v = partial[0];
  __syncthreads();  // partial is reused by the next call
  return v;
}

// Index of the j-th plane of the reduction set of plane (b, c).
__device__ __forceinline__ int64_t set_member(int64_t b, int64_t c, int64_t j, int64_t channels, bool batch,
                                              int64_t per_group) {
  return batch ? j * channels + c : b * channels + (c / per_group) * per_group + j;
}

// ---------------------------------------------------------------------------------------------
// Normalisation kernels

// Per plane (one block each): mean and centred sum of squares.
template <typename T>
__global__ void plane_moments_kernel(const T* x, int64_t hw, float* mean, float* m2) {
  const T* row = x + static_cast<int64_t>(blockIdx.x) * hw;
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) s += ld(row + i);
  const float m = block_sum(s) / static_cast<float>(hw);
  float q = 0.0f;
  for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
    const float d = ld(row + i) - m;
    q += d * d;
  }
  q = block_sum(q);
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = m;
    m2[blockIdx.x] = q;
  }
}

// Per (b, c): the mean and invstd of its reduction set, from the planes' moments.
__global__ void combine_moments_kernel(const float* pmean, const float* pm2, int64_t batch, int64_t channels,
                                       int64_t hw, bool batch_norm, int64_t per_group, float eps, float* mean,
                                       float* invstd) {
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (plane >= batch * channels) return;
  const int64_t b = plane / channels, c = plane % channels;
  const int64_t members = batch_norm ? batch : per_group;
  double n = 0.0, m = 0.0, sq = 0.0;
  for (int64_t j = 0; j < members; ++j) {
    const int64_t q = set_member(b, c, j, channels, batch_norm, per_group);
    const double n_b = static_cast<double>(hw), total = n + n_b;
    const double delta = static_cast<double>(pmean[q]) - m;
    m += delta * n_b / total;
    sq += static_cast<double>(pm2[q]) + delta * delta * n * n_b / total;
    n = total;
  }
  mean[plane] = static_cast<float>(m);
  invstd[plane] = static_cast<float>(rsqrt(sq / n + static_cast<double>(eps)));
}

template <typename T>
__global__ void normalize_kernel(const T* x, T* y, int64_t planes, int64_t channels, int64_t hw, const float* mean,
                                 const float* invstd, const float* weight, const float* bias) {
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t c = plane % channels;
    const float m = mean[plane], is = invstd[plane], w = weight[c], b = bias[c];
    const int64_t base = plane * hw;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < hw;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
      st(y + base + i, w * ((ld(x + base + i) - m) * is) + b);
  }
}

// Per plane: sums of dy and dy * xhat.
template <typename T>
__global__ void plane_dot_kernel(const T* dy, const T* xhat, int64_t hw, float* sum_dy, float* sum_dy_xhat) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * hw;
  float s1 = 0.0f, s2 = 0.0f;
  for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
    const float d = ld(dy + base + i);
    s1 += d;
    s2 += d * ld(xhat + base + i);
  }
  s1 = block_sum(s1);
  s2 = block_sum(s2);
  if (threadIdx.x == 0) {
    sum_dy[blockIdx.x] = s1;
    sum_dy_xhat[blockIdx.x] = s2;
  }
}

// Per (b, c): dx = a dy + b + c xhat with a = invstd w, b = -invstd mean_S(w dy),
// c = -invstd mean_S(w dy xhat).
__global__ void norm_vjp_coeffs_kernel(const float* sum_dy, const float* sum_dy_xhat, const float* invstd,
                                       const float* weight, int64_t batch, int64_t channels, int64_t hw,
                                       bool batch_norm, int64_t per_group, float* ca, float* cb, float* cc) {
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (plane >= batch * channels) return;
  const int64_t b = plane / channels, c = plane % channels;
  const int64_t members = batch_norm ? batch : per_group;
  double m1 = 0.0, m2 = 0.0;
  for (int64_t j = 0; j < members; ++j) {
    const int64_t q = set_member(b, c, j, channels, batch_norm, per_group);
    const double w = static_cast<double>(weight[q % channels]);
    m1 += w * static_cast<double>(sum_dy[q]);
    m2 += w * static_cast<double>(sum_dy_xhat[q]);
  }
  const double count = static_cast<double>(members) * static_cast<double>(hw);
  const double is = static_cast<double>(invstd[plane]);
  ca[plane] = static_cast<float>(is * static_cast<double>(weight[c]));
  cb[plane] = static_cast<float>(-is * m1 / count);
  cc[plane] = static_cast<float>(-is * m2 / count);
}

template <typename T>
__global__ void norm_vjp_apply_kernel(const T* dy, const T* xhat, T* dx, int64_t planes, int64_t hw, const float* ca,
                                      const float* cb, const float* cc) {
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const float a = ca[plane], b = cb[plane], c = cc[plane];
    const int64_t base = plane * hw;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < hw;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
      st(dx + base + i, a * ld(dy + base + i) + b + c * ld(xhat + base + i));
  }
}

// ---------------------------------------------------------------------------------------------
// Pass kernels

// Stages the (C, C) matrix w (transposed when `transpose`) in shared memory.
__device__ __forceinline__ void stage_matrix(const float* w, float* ws, int channels, bool transpose) {
  for (int i = threadIdx.x; i < channels * channels; i += blockDim.x)
    ws[i] = transpose ? w[(i % channels) * channels + i / channels] : w[i];
}

// acc = bias + sum_c ws[o][c] xs[c][thread]
__device__ __forceinline__ float mix(const float* ws, const float* xs, int o, int channels, float bias) {
  float acc = bias;
  const float* wo = ws + o * channels;
  for (int c = 0; c < channels; ++c) acc += wo[c] * xs[c * blockDim.x + threadIdx.x];
  return acc;
}

template <typename T, bool kLinearize>
__global__ void gate_inh_kernel(const T* h, T* hg, T* g1, T* slope, const float* w, const float* bias, int channels,
                                int64_t hw) {
  extern __shared__ float smem[];
  float* ws = smem;
  float* xs = smem + channels * channels;
  stage_matrix(w, ws, channels, false);
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = p < hw;
  const int64_t base = static_cast<int64_t>(blockIdx.y) * channels * hw + p;
  for (int c = 0; c < channels; ++c) xs[c * blockDim.x + threadIdx.x] = valid ? ld(h + base + c * hw) : 0.0f;
  __syncthreads();
  if (!valid) return;
  for (int o = 0; o < channels; ++o) {
    const float g = sigmoid(mix(ws, xs, o, channels, bias[o]));
    const float hv = xs[o * blockDim.x + threadIdx.x];
    const int64_t off = base + o * hw;
    st(hg + off, hv * g);
    if (kLinearize) {
      st(g1 + off, g);
      st(slope + off, hv * g * (1.0f - g));
    }
  }
}

struct NormPtrs {
  const float* mean;  // (B, C); null for kind "none"
  const float* invstd;
  const float* weight;  // (C,)
  const float* bias;
};

template <typename T, bool kLinearize>
__global__ void inhibit_kernel(const T* c1_raw, const T* x, const T* h, T* h1, T* g2, T* xhat, T* k_c1, T* k_h,
                               NormPtrs norm, const float* alpha, const float* mu, const float* w, const float* bias,
                               int channels, int64_t hw) {
  extern __shared__ float smem[];
  float* ws = smem;
  float* xs = smem + channels * channels;
  stage_matrix(w, ws, channels, false);
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = p < hw;
  const int64_t b = blockIdx.y;
  const int64_t base = b * channels * hw + p;
  for (int c = 0; c < channels; ++c) {
    float v = 0.0f;
    if (valid) {
      const int64_t off = base + c * hw;
      const float raw = ld(c1_raw + off);
      float xh = raw, c1 = raw;
      if (norm.mean != nullptr) {
        const int64_t plane = b * channels + c;
        xh = (raw - norm.mean[plane]) * norm.invstd[plane];
        c1 = norm.weight[c] * xh + norm.bias[c];
      }
      const float gate = alpha[c] * ld(h + off) + mu[c];
      const float q = c1 * gate;
      float sp_q, sig_q, sig_r;
      softplus_sigmoid(q, sp_q, sig_q);
      softplus_sigmoid(ld(x + off) - sp_q, v, sig_r);
      st(h1 + off, v);
      if (kLinearize) {
        const float k = -sig_r * sig_q;
        st(k_c1 + off, k * gate);
        st(k_h + off, k * c1 * alpha[c]);
        if (xhat != nullptr) st(xhat + off, xh);
      }
    }
    xs[c * blockDim.x + threadIdx.x] = v;
  }
  __syncthreads();
  if (!valid) return;
  for (int o = 0; o < channels; ++o) st(g2 + base + o * hw, sigmoid(mix(ws, xs, o, channels, bias[o])));
}

template <typename T, bool kLinearize>
__global__ void excite_mix_kernel(const T* c2_raw, const T* h, const T* h1, const T* g2, T* out, T* xhat, T* k_c2,
                                  T* k_h1, T* k_m2, T* k_h, NormPtrs norm, const float* kappa, const float* gamma,
                                  const float* omega, int64_t planes, int64_t channels, int64_t hw) {
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t c = plane % channels;
    const bool has_norm = norm.mean != nullptr;
    const float m = has_norm ? norm.mean[plane] : 0.0f, is = has_norm ? norm.invstd[plane] : 1.0f;
    const float nw = has_norm ? norm.weight[c] : 1.0f, nb = has_norm ? norm.bias[c] : 0.0f;
    const float ka = kappa[c], ga = gamma[c], om = omega[c];
    const int64_t base = plane * hw;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < hw;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t off = base + i;
      const float xh = (ld(c2_raw + off) - m) * is;
      const float c2 = nw * xh + nb;
      const float h1v = ld(h1 + off), hv = ld(h + off), g = ld(g2 + off);
      const float e = ka * h1v + ga * c2 + om * h1v * c2;
      float hh, sig_e, f, sig_z;
      softplus_sigmoid(e, hh, sig_e);
      softplus_sigmoid((1.0f - g) * hv + g * hh, f, sig_z);
      st(out + off, f);
      if (kLinearize) {
        const float de = sig_z * g * sig_e;
        st(k_c2 + off, de * (ga + om * h1v));
        st(k_h1 + off, de * (ka + om * c2));
        st(k_m2 + off, sig_z * (hh - hv) * g * (1.0f - g));
        st(k_h + off, sig_z * (1.0f - g));
        if (xhat != nullptr) st(xhat + off, xh);
      }
    }
  }
}

template <typename T>
__global__ void vjp_excite_mix_kernel(const T* v, const T* k_c2, const T* k_h1, const T* k_m2, const T* k_h, T* dc2,
                                      T* dh1, T* dh, const float* w, int channels, int64_t hw) {
  extern __shared__ float smem[];
  float* ws = smem;
  float* xs = smem + channels * channels;
  stage_matrix(w, ws, channels, true);  // U2^T
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = p < hw;
  const int64_t base = static_cast<int64_t>(blockIdx.y) * channels * hw + p;
  for (int c = 0; c < channels; ++c) {
    float dm2 = 0.0f;
    if (valid) {
      const int64_t off = base + c * hw;
      const float vv = ld(v + off);
      st(dc2 + off, vv * ld(k_c2 + off));
      st(dh + off, vv * ld(k_h + off));
      dm2 = vv * ld(k_m2 + off);
    }
    xs[c * blockDim.x + threadIdx.x] = dm2;
  }
  __syncthreads();
  if (!valid) return;
  for (int o = 0; o < channels; ++o) {
    const int64_t off = base + o * hw;
    st(dh1 + off, ld(v + off) * ld(k_h1 + off) + mix(ws, xs, o, channels, 0.0f));
  }
}

template <typename T>
__global__ void vjp_inhibit_kernel(const T* dh1, const T* extra, const T* dh, const T* k_c1, const T* k_h, T* dc1,
                                   T* dh_out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float d = ld(dh1 + i) + (extra != nullptr ? ld(extra + i) : 0.0f);
    const float dhv = ld(dh + i);
    st(dc1 + i, d * ld(k_c1 + i));
    st(dh_out + i, dhv + d * ld(k_h + i));
  }
}

template <typename T>
__global__ void vjp_gate_inh_kernel(const T* dhg, const T* dh, const T* g1, const T* slope, T* out, const float* w,
                                    int channels, int64_t hw) {
  extern __shared__ float smem[];
  float* ws = smem;
  float* xs = smem + channels * channels;
  stage_matrix(w, ws, channels, true);  // U1^T
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = p < hw;
  const int64_t base = static_cast<int64_t>(blockIdx.y) * channels * hw + p;
  for (int c = 0; c < channels; ++c) {
    const int64_t off = base + c * hw;
    xs[c * blockDim.x + threadIdx.x] = valid ? ld(dhg + off) * ld(slope + off) : 0.0f;
  }
  __syncthreads();
  if (!valid) return;
  for (int o = 0; o < channels; ++o) {
    const int64_t off = base + o * hw;
    const float acc = mix(ws, xs, o, channels, 0.0f);
    st(out + off, ld(dh + off) + ld(dhg + off) * ld(g1 + off) + acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers

struct Shape {
  int64_t batch, channels, hw;
  int64_t planes() const { return batch * channels; }
};

Shape shape_of(const Tensor& t) { return {t.size(0), t.size(1), t.size(2) * t.size(3)}; }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Grid of the plane kernels: blockIdx.y over planes, blockIdx.x over a plane's elements.
dim3 plane_grid(const Shape& s) {
  const int64_t per_plane = std::min<int64_t>((s.hw + kThreads - 1) / kThreads, 128);
  return dim3(static_cast<unsigned>(per_plane), static_cast<unsigned>(std::min<int64_t>(s.planes(), kMaxGridY)));
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, (n + kThreads - 1) / kThreads)); }

// Launches a pixel kernel: grid (pixel blocks, B), shared memory for the gate matrix and the
// block's channel vectors; above the default 48 KiB per block it opts in to more.
template <typename Kernel, typename... Args>
void launch_pixels(Kernel kernel, const Shape& s, Args... args) {
  TORCH_CHECK(s.batch <= kMaxGridY, "the CUDA pixel kernels take at most ", kMaxGridY, " samples, got ", s.batch);
  const size_t smem = sizeof(float) * static_cast<size_t>(s.channels * s.channels + s.channels * kPixelThreads);
  if (smem > 48 * 1024) {
    int device = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(smem <= static_cast<size_t>(optin), "C=", s.channels, " channels need ", smem,
                " bytes of shared memory per block for the 1x1 gates; this GPU allows ", optin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>((s.hw + kPixelThreads - 1) / kPixelThreads), static_cast<unsigned>(s.batch));
  kernel<<<grid, kPixelThreads, smem, stream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
T* ptr_or_null(Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

Tensor out_or_new(const Tensor& out, const Tensor& like) { return out.defined() ? out : alloc_output(like); }

// Per-(b, c) mean and invstd (float32, (B, C)) of c_raw over the norm's reduction sets.
std::tuple<Tensor, Tensor> reduce_stats(const Tensor& c_raw, const Norm& norm) {
  const Shape s = shape_of(c_raw);
  const auto opts = c_raw.options().dtype(at::kFloat);
  Tensor pmean = at::empty({s.planes()}, opts), pm2 = at::empty({s.planes()}, opts);
  Tensor mean = alloc_stats(c_raw), invstd = alloc_stats(c_raw);
  CRBP_DISPATCH_CUDA_TYPES(c_raw.scalar_type(), "plane_moments", [&] {
    plane_moments_kernel<scalar_t><<<static_cast<unsigned>(s.planes()), kThreads, 0, stream()>>>(
        c_raw.const_data_ptr<scalar_t>(), s.hw, pmean.mutable_data_ptr<float>(), pm2.mutable_data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  combine_moments_kernel<<<blocks_for(s.planes()), kThreads, 0, stream()>>>(
      pmean.const_data_ptr<float>(), pm2.const_data_ptr<float>(), s.batch, s.channels, s.hw,
      norm.kind == NormKind::kBatch, s.channels / norm.groups, static_cast<float>(norm.eps),
      mean.mutable_data_ptr<float>(), invstd.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, invstd};
}

NormPtrs norm_ptrs(const Norm& norm, const Tensor& mean, const Tensor& invstd) {
  if (norm.kind == NormKind::kNone) return {nullptr, nullptr, nullptr, nullptr};
  return {mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(), norm.weight.const_data_ptr<float>(),
          norm.bias.const_data_ptr<float>()};
}


// ---------------------------------------------------------------------------------------------
// The tracked step's plane passes (cpu/plane_passes.h), float32: the CPU kernels' own bodies
// (cpu/plane_impl.h, compiled here as device functions) on one element per thread, in the
// plane kernels' grid-stride shape; per-plane sums reduced over the block and added to the
// (B, C, n_sums) float64 output atomically. Checked at build time by ptxas's listing of each
// instantiation's stores (scripts/cuda_build_check.sh); not yet run on a GPU.

namespace plane {
using namespace crbp::cpu;  // PlaneArgs and the input / output / scalar index names
#include "../cpu/plane_impl.h"
}  // namespace plane

__device__ float g_plane_zero[1];  // what a None input reads (zero-initialised)

struct PlanePointers {
  const float* in[cpu::kPlaneMaxIn];
  float* out[cpu::kPlaneMaxOut];
  const float* scalars;
  double* sums;
};

template <int PASS>
__device__ __forceinline__ void plane_body(const cpu::PlaneArgs<float>& a) {
  using namespace cpu;
  if constexpr (PASS == kPlaneDot) plane::plane_dot<float>(a);
  else if constexpr (PASS == kTangentGateInh) plane::tangent_gate_inh<float>(a);
  else if constexpr (PASS == kTangentInhibit) plane::tangent_inhibit<float>(a);
  else if constexpr (PASS == kTangentExciteMix) plane::tangent_excite_mix<float>(a);
  else if constexpr (PASS == kNormVjpTangent) plane::norm_vjp_tangent<float>(a);
  else if constexpr (PASS == kTangentVjpInhibit) plane::tangent_vjp_inhibit<float>(a);
  else if constexpr (PASS == kTangentVjpGateInh) plane::tangent_vjp_gate_inh<float>(a);
  else if constexpr (PASS == kTrackedInhibit) plane::tracked_inhibit<float>(a);
  else if constexpr (PASS == kTrackedExciteMix) plane::tracked_excite_mix<float>(a);
  else if constexpr (PASS == kColumnSumsExciteMix) plane::column_sums_excite_mix<float>(a);
  else if constexpr (PASS == kColumnSumsInhibit) plane::column_sums_inhibit<float>(a);
  else if constexpr (PASS == kStepVjpExciteMix) plane::step_vjp_excite_mix<float>(a);
  else if constexpr (PASS == kStepVjpInhibit) plane::step_vjp_inhibit<float>(a);
  else if constexpr (PASS == kNativeFactors) plane::native_factors<float>(a);
  static_assert(PASS >= 0 && PASS < kPlanePasses, "a plane pass of plane_passes.h");
}

// The table's counts as constant expressions (device code may read a host constexpr array's
// scalars only through a constexpr function evaluated at compile time).
struct PlaneCounts {
  int n_in, n_out, n_scalars, n_sums;
};
__host__ __device__ constexpr PlaneCounts plane_counts(int pass) {
  return {cpu::kPlanePassSpecs[pass].n_in, cpu::kPlanePassSpecs[pass].n_out, cpu::kPlanePassSpecs[pass].n_scalars,
          cpu::kPlanePassSpecs[pass].n_sums};
}

template <int PASS>
__global__ void plane_pass_kernel(PlanePointers p, int64_t planes, int64_t hw) {
  constexpr PlaneCounts spec = plane_counts(PASS);
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    double total[cpu::kPlaneMaxSums + 1] = {};
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < hw;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t off = plane * hw + i;
      cpu::PlaneArgs<float> a;
      double sums[cpu::kPlaneMaxSums + 1];
#pragma unroll
      for (int k = 0; k < spec.n_in; ++k) a.in[k] = p.in[k] != nullptr ? p.in[k] + off : g_plane_zero;
      // Every output is a real buffer (a skipped one too, dropped by the host): with a
      // local-array fallback for skipped outputs nvcc 13.0 removed every store of the pass.
#pragma unroll
      for (int k = 0; k < spec.n_out; ++k) a.out[k] = p.out[k] + off;
      a.s = p.scalars != nullptr ? p.scalars + plane * spec.n_scalars : nullptr;
      a.sums = sums;
      a.n = 1;
      plane_body<PASS>(a);
#pragma unroll
      for (int k = 0; k < spec.n_sums; ++k) total[k] += sums[k];
    }
#pragma unroll
    for (int k = 0; k < spec.n_sums; ++k) {
      const double v = block_sum(total[k]);
      if (threadIdx.x == 0) atomicAdd(p.sums + plane * spec.n_sums + k, v);
    }
  }
}

template <int PASS>
void launch_plane_pass(const PlanePointers& p, const Shape& s) {
  plane_pass_kernel<PASS><<<plane_grid(s), kThreads, 0, stream()>>>(p, s.planes(), s.hw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Normalisation

std::tuple<Tensor, Tensor> norm_stats(const Tensor& c, const Norm& norm) {
  const c10::cuda::CUDAGuard guard(c.device());
  return reduce_stats(c, norm);
}

Tensor normalize(const Tensor& c, const Norm& norm) {
  if (norm.kind == NormKind::kNone) return c;
  const c10::cuda::CUDAGuard guard(c.device());
  const Shape s = shape_of(c);
  auto [mean, invstd] = reduce_stats(c, norm);
  Tensor y = alloc_output(c);
  CRBP_DISPATCH_CUDA_TYPES(c.scalar_type(), "normalize", [&] {
    normalize_kernel<scalar_t><<<plane_grid(s), kThreads, 0, stream()>>>(
        c.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), s.planes(), s.channels, s.hw,
        mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(), norm.weight.const_data_ptr<float>(),
        norm.bias.const_data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

Tensor norm_vjp(const Tensor& dy, const Tensor& xhat, const Tensor& invstd, const Norm& norm, const Tensor& out) {
  if (norm.kind == NormKind::kNone) return dy;
  const c10::cuda::CUDAGuard guard(dy.device());
  const Shape s = shape_of(dy);
  const auto opts = dy.options().dtype(at::kFloat);
  Tensor s1 = at::empty({s.planes()}, opts), s2 = at::empty({s.planes()}, opts);
  Tensor ca = at::empty({s.planes()}, opts), cb = at::empty({s.planes()}, opts), cc = at::empty({s.planes()}, opts);
  Tensor dx = out_or_new(out, dy);
  CRBP_DISPATCH_CUDA_TYPES(dy.scalar_type(), "norm_vjp", [&] {
    plane_dot_kernel<scalar_t><<<static_cast<unsigned>(s.planes()), kThreads, 0, stream()>>>(
        dy.const_data_ptr<scalar_t>(), xhat.const_data_ptr<scalar_t>(), s.hw, s1.mutable_data_ptr<float>(),
        s2.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    norm_vjp_coeffs_kernel<<<blocks_for(s.planes()), kThreads, 0, stream()>>>(
        s1.const_data_ptr<float>(), s2.const_data_ptr<float>(), invstd.const_data_ptr<float>(),
        norm.weight.const_data_ptr<float>(), s.batch, s.channels, s.hw, norm.kind == NormKind::kBatch,
        s.channels / norm.groups, ca.mutable_data_ptr<float>(), cb.mutable_data_ptr<float>(),
        cc.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    norm_vjp_apply_kernel<scalar_t><<<plane_grid(s), kThreads, 0, stream()>>>(
        dy.const_data_ptr<scalar_t>(), xhat.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
        s.planes(), s.hw, ca.const_data_ptr<float>(), cb.const_data_ptr<float>(), cc.const_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

// ---------------------------------------------------------------------------------------------
// Forward and linearize passes

std::vector<Tensor> gate_inh(const Tensor& h, const Tensor& u1_weight, const Tensor& u1_bias, bool linearize) {
  const c10::cuda::CUDAGuard guard(h.device());
  const Shape s = shape_of(h);
  Tensor hg = alloc_output(h), g1, slope;
  if (linearize) {
    g1 = alloc_output(h);
    slope = alloc_output(h);
  }
  CRBP_DISPATCH_CUDA_TYPES(h.scalar_type(), "gate_inh", [&] {
    using T = scalar_t;
    auto kernel = linearize ? gate_inh_kernel<T, true> : gate_inh_kernel<T, false>;
    launch_pixels(kernel, s, h.const_data_ptr<T>(), hg.mutable_data_ptr<T>(), ptr_or_null<T>(g1),
                  ptr_or_null<T>(slope), u1_weight.const_data_ptr<float>(), u1_bias.const_data_ptr<float>(),
                  static_cast<int>(s.channels), s.hw);
  });
  if (!linearize) return {hg};
  return {hg, g1, slope};
}

std::vector<Tensor> inhibit(const Tensor& c1_raw, const Tensor& x, const Tensor& h, const Norm& norm,
                            const Tensor& alpha, const Tensor& mu, const Tensor& u2_weight, const Tensor& u2_bias,
                            bool linearize, const Tensor& h1_out, const Tensor& g2_out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Shape s = shape_of(x);
  const bool has_norm = norm.kind != NormKind::kNone;
  Tensor mean, invstd;
  if (has_norm) std::tie(mean, invstd) = reduce_stats(c1_raw, norm);
  Tensor h1 = out_or_new(h1_out, x), g2 = out_or_new(g2_out, x), xhat, k_c1, k_h;
  if (linearize) {
    k_c1 = alloc_output(x);
    k_h = alloc_output(x);
    if (has_norm) xhat = alloc_output(x);
  }
  CRBP_DISPATCH_CUDA_TYPES(x.scalar_type(), "inhibit", [&] {
    using T = scalar_t;
    auto kernel = linearize ? inhibit_kernel<T, true> : inhibit_kernel<T, false>;
    launch_pixels(kernel, s, c1_raw.const_data_ptr<T>(), x.const_data_ptr<T>(), h.const_data_ptr<T>(),
                  h1.mutable_data_ptr<T>(), g2.mutable_data_ptr<T>(), ptr_or_null<T>(xhat), ptr_or_null<T>(k_c1),
                  ptr_or_null<T>(k_h), norm_ptrs(norm, mean, invstd), alpha.const_data_ptr<float>(),
                  mu.const_data_ptr<float>(), u2_weight.const_data_ptr<float>(), u2_bias.const_data_ptr<float>(),
                  static_cast<int>(s.channels), s.hw);
  });
  if (!linearize) return {h1, g2};
  return {h1, g2, xhat, has_norm ? invstd : Tensor(), k_c1, k_h};
}

std::vector<Tensor> excite_mix(const Tensor& c2_raw, const Tensor& h, const Tensor& h1, const Tensor& g2,
                               const Norm& norm, const Tensor& kappa, const Tensor& gamma, const Tensor& omega,
                               bool linearize, const Tensor& out_buffer) {
  const c10::cuda::CUDAGuard guard(h.device());
  const Shape s = shape_of(h);
  const bool has_norm = norm.kind != NormKind::kNone;
  Tensor mean, invstd;
  if (has_norm) std::tie(mean, invstd) = reduce_stats(c2_raw, norm);
  Tensor out = out_or_new(out_buffer, h), xhat, k_c2, k_h1, k_m2, k_h;
  if (linearize) {
    k_c2 = alloc_output(h);
    k_h1 = alloc_output(h);
    k_m2 = alloc_output(h);
    k_h = alloc_output(h);
    if (has_norm) xhat = alloc_output(h);
  }
  CRBP_DISPATCH_CUDA_TYPES(h.scalar_type(), "excite_mix", [&] {
    using T = scalar_t;
    auto kernel = linearize ? excite_mix_kernel<T, true> : excite_mix_kernel<T, false>;
    kernel<<<plane_grid(s), kThreads, 0, stream()>>>(
        c2_raw.const_data_ptr<T>(), h.const_data_ptr<T>(), h1.const_data_ptr<T>(), g2.const_data_ptr<T>(),
        out.mutable_data_ptr<T>(), ptr_or_null<T>(xhat), ptr_or_null<T>(k_c2), ptr_or_null<T>(k_h1),
        ptr_or_null<T>(k_m2), ptr_or_null<T>(k_h), norm_ptrs(norm, mean, invstd), kappa.const_data_ptr<float>(),
        gamma.const_data_ptr<float>(), omega.const_data_ptr<float>(), s.planes(), s.channels, s.hw);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!linearize) return {out};
  return {out, xhat, has_norm ? invstd : Tensor(), k_c2, k_h1, k_m2, k_h};
}

// ---------------------------------------------------------------------------------------------
// VJP passes

std::vector<Tensor> vjp_excite_mix(const Tensor& v, const Tensor& v_to_dc2, const Tensor& v_to_dh1,
                                   const Tensor& v_to_dm2, const Tensor& v_to_dh, const Tensor& u2_weight,
                                   const Tensor& dc2_out, const Tensor& dh1_out) {
  const c10::cuda::CUDAGuard guard(v.device());
  const Shape s = shape_of(v);
  Tensor dc2 = out_or_new(dc2_out, v), dh1 = out_or_new(dh1_out, v), dh = alloc_output(v);
  CRBP_DISPATCH_CUDA_TYPES(v.scalar_type(), "vjp_excite_mix", [&] {
    using T = scalar_t;
    launch_pixels(vjp_excite_mix_kernel<T>, s, v.const_data_ptr<T>(), v_to_dc2.const_data_ptr<T>(),
                  v_to_dh1.const_data_ptr<T>(), v_to_dm2.const_data_ptr<T>(), v_to_dh.const_data_ptr<T>(),
                  dc2.mutable_data_ptr<T>(), dh1.mutable_data_ptr<T>(), dh.mutable_data_ptr<T>(),
                  u2_weight.const_data_ptr<float>(), static_cast<int>(s.channels), s.hw);
  });
  return {dc2, dh1, dh};
}

std::vector<Tensor> vjp_inhibit(const Tensor& dh1, const Tensor& dh1_extra, const Tensor& dh,
                                const Tensor& dh1_to_dc1, const Tensor& dh1_to_dh, const Tensor& dc1_out,
                                const Tensor& dh_out_buffer) {
  const c10::cuda::CUDAGuard guard(dh1.device());
  Tensor dc1 = out_or_new(dc1_out, dh1), dh_out = out_or_new(dh_out_buffer, dh1);
  const int64_t n = dh1.numel();
  CRBP_DISPATCH_CUDA_TYPES(dh1.scalar_type(), "vjp_inhibit", [&] {
    using T = scalar_t;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16));
    vjp_inhibit_kernel<T><<<blocks, kThreads, 0, stream()>>>(
        dh1.const_data_ptr<T>(), dh1_extra.defined() ? dh1_extra.const_data_ptr<T>() : nullptr,
        dh.const_data_ptr<T>(), dh1_to_dc1.const_data_ptr<T>(), dh1_to_dh.const_data_ptr<T>(),
        dc1.mutable_data_ptr<T>(), dh_out.mutable_data_ptr<T>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dc1, dh_out};
}

Tensor vjp_gate_inh(const Tensor& dhg, const Tensor& dh, const Tensor& g1, const Tensor& dhg_to_dm1,
                    const Tensor& u1_weight, const Tensor& out_buffer) {
  const c10::cuda::CUDAGuard guard(dhg.device());
  const Shape s = shape_of(dhg);
  Tensor out = out_or_new(out_buffer, dhg);
  CRBP_DISPATCH_CUDA_TYPES(dhg.scalar_type(), "vjp_gate_inh", [&] {
    using T = scalar_t;
    launch_pixels(vjp_gate_inh_kernel<T>, s, dhg.const_data_ptr<T>(), dh.const_data_ptr<T>(), g1.const_data_ptr<T>(),
                  dhg_to_dm1.const_data_ptr<T>(), out.mutable_data_ptr<T>(), u1_weight.const_data_ptr<float>(),
                  static_cast<int>(s.channels), s.hw);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The FFT conv's channel mix (crbp_fast/conv/fft.py, spectral_mix). One warp per (tile, y, b):
// lane t owns frequency p0 + t, so each spectrum row K[o, c, :, tile] of 32 values is one
// coalesced load; the sum over the X input channels runs in registers.

namespace {

template <typename T, bool CONJ>
__global__ void spectral_mix_kernel(const T* __restrict__ z, const T* __restrict__ spec, T* __restrict__ out,
                                    int batch, int nx, int ny, std::int64_t planes) {
  constexpr int L = static_cast<int>(kSpectralMixLanes);
  const int lane = threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  const std::int64_t tile = blockIdx.x;
  const int b = blockIdx.z;
  if (y >= ny) return;
  const std::int64_t p = tile * L + lane;
  const bool valid = p < planes;
  // K[o, c] blocks: forward reads K[y, x] (C = X), transpose K[x, y] (C = Y).
  const std::int64_t block = static_cast<std::int64_t>(nx) * ny * 2 * L;
  const T* k = spec + tile * block + lane;
  const std::int64_t stride_y = CONJ ? 2 * L : static_cast<std::int64_t>(nx) * 2 * L;
  const std::int64_t stride_x = CONJ ? static_cast<std::int64_t>(ny) * 2 * L : 2 * L;
  T ar = T(0), ai = T(0);
  for (int x = 0; x < nx; ++x) {
    const T* kk = k + y * stride_y + x * stride_x;
    const T kr = kk[0], ki = kk[L];
    T zr = T(0), zi = T(0);
    if (valid) {
      const T* zz = z + ((static_cast<std::int64_t>(b) * nx + x) * planes + p) * 2;
      zr = zz[0];
      zi = zz[1];
    }
    if (CONJ) {
      ar += kr * zr + ki * zi;
      ai += kr * zi - ki * zr;
    } else {
      ar += kr * zr - ki * zi;
      ai += kr * zi + ki * zr;
    }
  }
  if (valid) {
    T* o = out + ((static_cast<std::int64_t>(b) * ny + y) * planes + p) * 2;
    o[0] = ar;
    o[1] = ai;
  }
}

}  // namespace

Tensor spectral_mix(const Tensor& z, const Tensor& spec, bool transpose, const Tensor& out_buffer) {
  const c10::cuda::CUDAGuard guard(z.device());
  const std::int64_t batch = z.size(0), nx = z.size(1), planes = z.size(2);
  const std::int64_t ny = transpose ? spec.size(2) : spec.size(1);
  const std::int64_t tiles = spec.size(0);
  Tensor out = out_buffer.defined() ? out_buffer : alloc_output(at::empty({1}, z.options()).expand({batch, ny, planes, 2}));
  TORCH_CHECK(tiles < (1LL << 31) && batch <= 65535, "spectral_mix: grid too large (", tiles, " tiles, batch ",
              batch, ")");
  constexpr int kWarpsPerBlock = 4;
  const dim3 block(static_cast<unsigned>(kSpectralMixLanes), kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((ny + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>(batch));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "spectral_mix", [&] {
    using T = scalar_t;
    if (transpose) {
      spectral_mix_kernel<T, true><<<grid, block, 0, stream()>>>(
          z.const_data_ptr<T>(), spec.const_data_ptr<T>(), out.mutable_data_ptr<T>(), static_cast<int>(batch),
          static_cast<int>(nx), static_cast<int>(ny), planes);
    } else {
      spectral_mix_kernel<T, false><<<grid, block, 0, stream()>>>(
          z.const_data_ptr<T>(), spec.const_data_ptr<T>(), out.mutable_data_ptr<T>(), static_cast<int>(batch),
          static_cast<int>(nx), static_cast<int>(ny), planes);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

namespace {

// One warp per (tile, o, c): lane t sums over the batch at frequency p0 + t and writes S's
// row of that frequency (u Nh + v -> v M + u).
template <typename T>
__global__ void spectral_outer_kernel(const T* __restrict__ p, const T* __restrict__ q, T* __restrict__ d, int batch,
                                      int no, int nc, std::int64_t planes, std::int64_t rows) {
  constexpr int L = static_cast<int>(kSpectralMixLanes);
  const int lane = threadIdx.x;
  const int pair = blockIdx.y * blockDim.y + threadIdx.y;
  if (pair >= no * nc) return;
  const int o = pair / nc, c = pair % nc;
  const std::int64_t f = static_cast<std::int64_t>(blockIdx.x) * L + lane;
  if (f >= planes) return;
  T ar = T(0), ai = T(0);
  for (int b = 0; b < batch; ++b) {
    const T* pp = p + ((static_cast<std::int64_t>(b) * no + o) * planes + f) * 2;
    const T* qq = q + ((static_cast<std::int64_t>(b) * nc + c) * planes + f) * 2;
    ar += pp[0] * qq[0] + pp[1] * qq[1];
    ai += pp[1] * qq[0] - pp[0] * qq[1];
  }
  const std::int64_t cols = planes / rows;
  const std::int64_t row = ((f % cols) * rows + f / cols) * 2 * nc * no;
  d[row + c * no + o] = ar;
  d[row + (nc + c) * no + o] = ai;
}

}  // namespace

Tensor spectral_outer(const Tensor& p, const Tensor& q, std::int64_t rows, const Tensor& out) {
  const c10::cuda::CUDAGuard guard(p.device());
  const std::int64_t batch = p.size(0), no = p.size(1), nc = q.size(1), planes = p.size(2);
  const std::int64_t lanes = kSpectralMixLanes;
  const std::int64_t tiles = (planes + lanes - 1) / lanes;
  Tensor d = out.defined() ? out : alloc_output(at::empty({1}, p.options()).expand({planes, 2 * nc, no}));
  TORCH_CHECK(tiles < (1LL << 31), "spectral_outer: grid too large (", tiles, " tiles)");
  constexpr int kWarpsPerBlock = 4;
  const dim3 block(static_cast<unsigned>(lanes), kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((no * nc + kWarpsPerBlock - 1) / kWarpsPerBlock));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "spectral_outer", [&] {
    using T = scalar_t;
    spectral_outer_kernel<T><<<grid, block, 0, stream()>>>(p.const_data_ptr<T>(), q.const_data_ptr<T>(),
                                                           d.mutable_data_ptr<T>(), static_cast<int>(batch),
                                                           static_cast<int>(no), static_cast<int>(nc), planes, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

std::vector<Tensor> plane_pass(int pass, const std::vector<Tensor>& in, const Tensor& scalars, int64_t skip) {
  const cpu::PlanePassSpec& spec = cpu::kPlanePassSpecs[pass];
  const Tensor& ref = in[0];
  TORCH_CHECK(ref.scalar_type() == at::kFloat, spec.name, ": the CUDA plane passes take float32, got ",
              ref.scalar_type());
  const c10::cuda::CUDAGuard guard(ref.device());
  const Shape s = shape_of(ref);
  std::vector<Tensor> out(static_cast<size_t>(spec.n_out));
  PlanePointers p{};
  for (int i = 0; i < spec.n_in; ++i) p.in[i] = in[i].defined() ? in[i].const_data_ptr<float>() : nullptr;
  std::vector<Tensor> dropped;  // the skipped outputs' buffers, written and freed
  for (int o = 0; o < spec.n_out; ++o) {
    Tensor t = alloc_output(ref);
    p.out[o] = t.mutable_data_ptr<float>();
    if ((skip >> o) & 1) {
      dropped.push_back(t);
    } else {
      out[o] = t;
    }
  }
  p.scalars = scalars.defined() ? scalars.const_data_ptr<float>() : nullptr;
  Tensor sums;
  if (spec.n_sums > 0) {
    sums = at::zeros({s.batch, s.channels, spec.n_sums}, ref.options().dtype(at::kDouble));
    p.sums = sums.mutable_data_ptr<double>();
  }
  switch (pass) {
#define CRBP_PLANE_CASE(P) \
  case P:                  \
    launch_plane_pass<P>(p, s); \
    break;
    CRBP_PLANE_CASE(0) CRBP_PLANE_CASE(1) CRBP_PLANE_CASE(2) CRBP_PLANE_CASE(3) CRBP_PLANE_CASE(4)
    CRBP_PLANE_CASE(5) CRBP_PLANE_CASE(6) CRBP_PLANE_CASE(7) CRBP_PLANE_CASE(8) CRBP_PLANE_CASE(9)
    CRBP_PLANE_CASE(10) CRBP_PLANE_CASE(11) CRBP_PLANE_CASE(12) CRBP_PLANE_CASE(13)
#undef CRBP_PLANE_CASE
    default:
      TORCH_CHECK(false, spec.name, ": no CUDA kernel for plane pass ", pass);
  }
  static_assert(cpu::kPlanePasses == 14, "a new plane pass needs its case above");
  if (spec.n_sums > 0) out.push_back(sums);
  return out;
}

}  // namespace crbp::cuda
