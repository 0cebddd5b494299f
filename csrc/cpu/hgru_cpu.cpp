// CPU implementation of the hGRU passes: work split with at::parallel_for, per-(b, c)
// normalisation statistics, and the vectorised kernels of kernels_impl.h for the ISA picked
// at run time. Arguments are validated by ops.cpp.
//
// Every normalisation kind is the same three steps: per-(b, c) plane sums (in double, over
// chunks of a plane so that a few large planes still split across threads), a combination of
// the planes of each reduction set (Chan et al.'s pairwise update for mean and variance), and a
// per-(b, c) affine apply fused into the pass that consumes the conv output.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../hgru.h"
#include "kernel_table.h"

namespace crbp::cpu {
namespace {

using at::Tensor;
using std::int64_t;

// ---------------------------------------------------------------------------------------------
// Instruction set

enum Isa : int { kIsaUnset = -1, kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
std::atomic<int> g_isa{kIsaUnset};
constexpr const char* kIsaNames[] = {"base", "avx2", "avx512"};

// Whether the CPU (and the OS, whose saved register state libgcc's cpuinfo checks) runs `isa`.
bool cpu_has(int isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kIsaAvx2) return avx2;
  if (isa == kIsaAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
#endif
  return isa == kIsaBase;
}

int parse_isa(const char* name, const char* source) {
  int isa = kIsaUnset;
  for (int i = kIsaBase; i <= kIsaAvx512; ++i)
    if (std::strcmp(name, kIsaNames[i]) == 0) isa = i;
  TORCH_CHECK(isa != kIsaUnset, source, ": expected 'base', 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK(cpu_has(isa), source, ": '", name, "' was asked for but this CPU does not run it",
              isa == kIsaAvx512 ? " (AVX-512 F, VL, DQ and BW)" : " (AVX2 + FMA)");
  return isa;
}

// The widest instruction set this CPU runs: AVX-512 halves the time of the transcendental-bound
// passes against AVX2 on the CPU this was measured on (crbp_fast/bench/targets.py).
int best_isa() { return cpu_has(kIsaAvx512) ? kIsaAvx512 : cpu_has(kIsaAvx2) ? kIsaAvx2 : kIsaBase; }

int current_isa() {
  int isa = g_isa.load();
  if (isa == kIsaUnset) {
    const char* env = std::getenv("CRBP_FAST_CPU_ISA");
    isa = (env != nullptr && *env != '\0') ? parse_isa(env, "CRBP_FAST_CPU_ISA") : best_isa();
    g_isa.store(isa);
  }
  return isa;
}

template <typename T>
const KernelTable<T>& kernels() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (current_isa() == kIsaAvx512) return avx512::kernel_table<T>();
  if (current_isa() == kIsaAvx2) return avx2::kernel_table<T>();
#endif
  return base::kernel_table<T>();
}

// ---------------------------------------------------------------------------------------------
// Work splitting

struct Shape {
  int64_t batch, channels, hw;
  int64_t planes() const { return batch * channels; }
};

Shape shape_of(const Tensor& t) { return {t.size(0), t.size(1), t.size(2) * t.size(3)}; }

// Elements per work unit of the plane-wise passes (a chunk of one (b, c) plane).
constexpr int64_t kPlaneChunk = 8192;

// fn(plane, start, n) over every chunk of every plane, in parallel.
template <typename F>
void for_each_plane_chunk(const Shape& s, int64_t chunk, const F& fn) {
  const int64_t per_plane = (s.hw + chunk - 1) / chunk;
  at::parallel_for(0, s.planes() * per_plane, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t plane = u / per_plane;
      const int64_t start = (u % per_plane) * chunk;
      fn(plane, start, std::min(chunk, s.hw - start));
    }
  });
}

// fn(b, p0, n, scratch) over every tile of kTile<T> pixels of every sample, in parallel; each
// worker owns a scratch block of 2 * C * kTile<T> elements.
template <typename T, typename F>
void for_each_tile(const Shape& s, const F& fn) {
  constexpr int64_t K = kTile<T>;
  const int64_t per_sample = (s.hw + K - 1) / K;
  at::parallel_for(0, s.batch * per_sample, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(static_cast<size_t>(2 * s.channels * K));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / per_sample;
      const int64_t p0 = (u % per_sample) * K;
      fn(b, p0, std::min(K, s.hw - p0), scratch.data());
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Normalisation statistics

// The reduction set of plane (b, c): channel c for "batch", (b, group of c) for "group".
int64_t set_of(const Shape& s, const Norm& norm, int64_t plane) {
  const int64_t b = plane / s.channels, c = plane % s.channels;
  if (norm.kind == NormKind::kBatch) return c;
  return b * norm.groups + c / (s.channels / norm.groups);
}

int64_t num_sets(const Shape& s, const Norm& norm) {
  return norm.kind == NormKind::kBatch ? s.channels : s.batch * norm.groups;
}

// Per-(b, c) mean and invstd over the reduction sets, in T; for kNone mean 0 and invstd 1, so
// that the kernels apply every kind alike.
template <typename T>
struct PlaneNorm {
  std::vector<T> mean, invstd, weight, bias;
  NormView<T> view(int64_t b, int64_t channels) const {
    return {mean.data() + b * channels, invstd.data() + b * channels, weight.data(), bias.data()};
  }
};

constexpr int64_t kStatChunk = 16384;

template <typename T>
PlaneNorm<T> plane_norm(const Tensor& c_raw, const Norm& norm) {
  const Shape s = shape_of(c_raw);
  PlaneNorm<T> out;
  const auto planes = static_cast<size_t>(s.planes());
  const auto channels = static_cast<size_t>(s.channels);
  if (norm.kind == NormKind::kNone) {
    out.mean.assign(planes, T(0));
    out.invstd.assign(planes, T(1));
    out.weight.assign(channels, T(1));
    out.bias.assign(channels, T(0));
    return out;
  }
  const int64_t per_plane = (s.hw + kStatChunk - 1) / kStatChunk;
  std::vector<double> unit_mean(static_cast<size_t>(s.planes() * per_plane));
  std::vector<double> unit_m2(unit_mean.size());
  const T* data = c_raw.const_data_ptr<T>();
  const auto& k = kernels<T>();
  for_each_plane_chunk(s, kStatChunk, [&](int64_t plane, int64_t start, int64_t n) {
    const int64_t u = plane * per_plane + start / kStatChunk;
    k.moments(data + plane * s.hw + start, n, &unit_mean[u], &unit_m2[u]);
  });
  // Chan et al.: merging (n_a, mean_a, M2_a) and (n_b, mean_b, M2_b) is exact in real
  // arithmetic and avoids the cancellation of sum-of-squares formulas.
  struct Acc {
    double n = 0, mean = 0, m2 = 0;
  };
  std::vector<Acc> sets(static_cast<size_t>(num_sets(s, norm)));
  for (int64_t plane = 0; plane < s.planes(); ++plane) {
    Acc& acc = sets[set_of(s, norm, plane)];
    for (int64_t j = 0; j < per_plane; ++j) {
      const int64_t u = plane * per_plane + j;
      const double n_b = static_cast<double>(std::min(kStatChunk, s.hw - j * kStatChunk));
      const double n = acc.n + n_b;
      const double delta = unit_mean[u] - acc.mean;
      acc.mean += delta * n_b / n;
      acc.m2 += unit_m2[u] + delta * delta * acc.n * n_b / n;
      acc.n = n;
    }
  }
  out.mean.resize(planes);
  out.invstd.resize(planes);
  for (int64_t plane = 0; plane < s.planes(); ++plane) {
    const Acc& acc = sets[set_of(s, norm, plane)];
    out.mean[plane] = static_cast<T>(acc.mean);
    out.invstd[plane] = static_cast<T>(1.0 / std::sqrt(acc.m2 / acc.n + norm.eps));
  }
  if (norm.weight.defined()) {  // norm_stats passes no affine: it needs mean and invstd only
    const T* w = norm.weight.const_data_ptr<T>();
    const T* b = norm.bias.const_data_ptr<T>();
    out.weight.assign(w, w + s.channels);
    out.bias.assign(b, b + s.channels);
  }
  return out;
}

template <typename T>
Tensor stats_tensor(const std::vector<T>& values, const Tensor& like_map) {
  Tensor t = alloc_stats(like_map);
  std::copy(values.begin(), values.end(), t.mutable_data_ptr<T>());
  return t;
}

template <typename T>
std::vector<T> transposed(const Tensor& w) {
  const int64_t n = w.size(0);
  const T* src = w.const_data_ptr<T>();
  std::vector<T> out(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) out[j * n + i] = src[i * n + j];
  return out;
}

// out when the caller passed a buffer, else a new output like `like`.
Tensor out_or_new(const Tensor& out, const Tensor& like) { return out.defined() ? out : alloc_output(like); }

template <typename T>
T* ptr_or_null(Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace

// The table that kernels() dispatches to names itself: what runs, not what was asked for.
const char* isa() { return kernels<float>().isa; }

void set_isa(const char* name) { g_isa.store(parse_isa(name, "set_cpu_isa")); }

// ---------------------------------------------------------------------------------------------
// Normalisation

std::tuple<Tensor, Tensor> norm_stats(const Tensor& c, const Norm& norm) {
  Tensor mean, invstd;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "norm_stats", [&] {
    const PlaneNorm<scalar_t> pn = plane_norm<scalar_t>(c, norm);
    mean = stats_tensor(pn.mean, c);
    invstd = stats_tensor(pn.invstd, c);
  });
  return {mean, invstd};
}

Tensor normalize(const Tensor& c, const Norm& norm) {
  if (norm.kind == NormKind::kNone) return c;
  const Shape s = shape_of(c);
  Tensor y = alloc_output(c);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "normalize", [&] {
    using T = scalar_t;
    const PlaneNorm<T> pn = plane_norm<T>(c, norm);
    const T* src = c.const_data_ptr<T>();
    T* dst = y.mutable_data_ptr<T>();
    const auto& k = kernels<T>();
    for_each_plane_chunk(s, kPlaneChunk, [&](int64_t plane, int64_t start, int64_t n) {
      const int64_t ch = plane % s.channels, off = plane * s.hw + start;
      k.normalize(src + off, dst + off, n, pn.mean[plane], pn.invstd[plane], pn.weight[ch], pn.bias[ch]);
    });
  });
  return y;
}

Tensor norm_vjp(const Tensor& dy, const Tensor& xhat, const Tensor& invstd, const Norm& norm, const Tensor& out) {
  if (norm.kind == NormKind::kNone) return dy;
  const Shape s = shape_of(dy);
  Tensor dx = out_or_new(out, dy);
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "norm_vjp", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const T* dyp = dy.const_data_ptr<T>();
    const T* xp = xhat.const_data_ptr<T>();
    const T* inv = invstd.const_data_ptr<T>();
    const T* w = norm.weight.const_data_ptr<T>();
    const int64_t per_plane = (s.hw + kStatChunk - 1) / kStatChunk;
    std::vector<double> s1(static_cast<size_t>(s.planes() * per_plane)), s2(s1.size());
    for_each_plane_chunk(s, kStatChunk, [&](int64_t plane, int64_t start, int64_t n) {
      const int64_t u = plane * per_plane + start / kStatChunk, off = plane * s.hw + start;
      k.dot_sums(dyp + off, xp + off, n, &s1[u], &s2[u]);
    });
    // Means over each set of dxh = weight * dy and of dxh * xhat.
    std::vector<double> m1(static_cast<size_t>(num_sets(s, norm)), 0.0), m2(m1.size(), 0.0);
    for (int64_t plane = 0; plane < s.planes(); ++plane) {
      const int64_t set = set_of(s, norm, plane);
      const double wc = static_cast<double>(w[plane % s.channels]);
      for (int64_t j = 0; j < per_plane; ++j) {
        m1[set] += wc * s1[plane * per_plane + j];
        m2[set] += wc * s2[plane * per_plane + j];
      }
    }
    const double set_size = static_cast<double>(s.planes() / num_sets(s, norm) * s.hw);
    T* dxp = dx.mutable_data_ptr<T>();
    for_each_plane_chunk(s, kPlaneChunk, [&](int64_t plane, int64_t start, int64_t n) {
      const int64_t set = set_of(s, norm, plane), off = plane * s.hw + start;
      const double is = static_cast<double>(inv[plane]);
      const double wc = static_cast<double>(w[plane % s.channels]);
      k.norm_vjp_apply(dyp + off, xp + off, dxp + off, n, static_cast<T>(is * wc),
                       static_cast<T>(-is * m1[set] / set_size), static_cast<T>(-is * m2[set] / set_size));
    });
  });
  return dx;
}

// ---------------------------------------------------------------------------------------------
// Forward and linearize passes

std::vector<Tensor> gate_inh(const Tensor& h, const Tensor& u1_weight, const Tensor& u1_bias, bool linearize) {
  const Shape s = shape_of(h);
  Tensor hg = alloc_output(h), g1, slope;
  if (linearize) {
    g1 = alloc_output(h);
    slope = alloc_output(h);
  }
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gate_inh", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const GateInhArgs<T> base{h.const_data_ptr<T>(), hg.mutable_data_ptr<T>(), ptr_or_null<T>(g1),
                              ptr_or_null<T>(slope), u1_weight.const_data_ptr<T>(), u1_bias.const_data_ptr<T>()};
    for_each_tile<T>(s, [&](int64_t b, int64_t p0, int64_t n, T* scratch) {
      const int64_t off = b * s.channels * s.hw + p0;
      GateInhArgs<T> a = base;
      a.h += off;
      a.hg += off;
      if (linearize) {
        a.g1 += off;
        a.dhg_to_dm1 += off;
      }
      k.gate_inh(a, s.channels, s.hw, n, scratch);
    });
  });
  if (!linearize) return {hg};
  return {hg, g1, slope};
}

std::vector<Tensor> inhibit(const Tensor& c1_raw, const Tensor& x, const Tensor& h, const Norm& norm,
                            const Tensor& alpha, const Tensor& mu, const Tensor& u2_weight, const Tensor& u2_bias,
                            bool linearize, const Tensor& h1_out, const Tensor& g2_out) {
  const Shape s = shape_of(x);
  const bool has_norm = norm.kind != NormKind::kNone;
  Tensor h1 = out_or_new(h1_out, x), g2 = out_or_new(g2_out, x), xhat, invstd, k_c1, k_h;
  if (linearize) {
    k_c1 = alloc_output(x);
    k_h = alloc_output(x);
    if (has_norm) xhat = alloc_output(x);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "inhibit", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const PlaneNorm<T> pn = plane_norm<T>(c1_raw, norm);
    if (linearize && has_norm) invstd = stats_tensor(pn.invstd, x);
    const InhibitArgs<T> base{c1_raw.const_data_ptr<T>(), x.const_data_ptr<T>(), h.const_data_ptr<T>(),
                              h1.mutable_data_ptr<T>(),   g2.mutable_data_ptr<T>(), ptr_or_null<T>(xhat),
                              ptr_or_null<T>(k_c1),        ptr_or_null<T>(k_h),      pn.view(0, s.channels),
                              alpha.const_data_ptr<T>(),   mu.const_data_ptr<T>(),   u2_weight.const_data_ptr<T>(),
                              u2_bias.const_data_ptr<T>()};
    for_each_tile<T>(s, [&](int64_t b, int64_t p0, int64_t n, T* scratch) {
      const int64_t off = b * s.channels * s.hw + p0;
      InhibitArgs<T> a = base;
      a.c1_raw += off;
      a.x += off;
      a.h += off;
      a.h1 += off;
      a.g2 += off;
      if (a.xhat != nullptr) a.xhat += off;
      if (linearize) {
        a.dh1_to_dc1 += off;
        a.dh1_to_dh += off;
      }
      a.norm = pn.view(b, s.channels);
      k.inhibit(a, s.channels, s.hw, n, scratch);
    });
  });
  if (!linearize) return {h1, g2};
  return {h1, g2, xhat, invstd, k_c1, k_h};
}

std::vector<Tensor> excite_mix(const Tensor& c2_raw, const Tensor& h, const Tensor& h1, const Tensor& g2,
                               const Norm& norm, const Tensor& kappa, const Tensor& gamma, const Tensor& omega,
                               bool linearize, const Tensor& out_buffer) {
  const Shape s = shape_of(h);
  const bool has_norm = norm.kind != NormKind::kNone;
  Tensor out = out_or_new(out_buffer, h), xhat, invstd, k_c2, k_h1, k_m2, k_h;
  if (linearize) {
    k_c2 = alloc_output(h);
    k_h1 = alloc_output(h);
    k_m2 = alloc_output(h);
    k_h = alloc_output(h);
    if (has_norm) xhat = alloc_output(h);
  }
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "excite_mix", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const PlaneNorm<T> pn = plane_norm<T>(c2_raw, norm);
    if (linearize && has_norm) invstd = stats_tensor(pn.invstd, h);
    ExciteMixArgs<T> base{};
    base.c2_raw = c2_raw.const_data_ptr<T>();
    base.h = h.const_data_ptr<T>();
    base.h1 = h1.const_data_ptr<T>();
    base.g2 = g2.const_data_ptr<T>();
    base.out = out.mutable_data_ptr<T>();
    base.xhat = ptr_or_null<T>(xhat);
    base.v_to_dc2 = ptr_or_null<T>(k_c2);
    base.v_to_dh1 = ptr_or_null<T>(k_h1);
    base.v_to_dm2 = ptr_or_null<T>(k_m2);
    base.v_to_dh = ptr_or_null<T>(k_h);
    const T* kap = kappa.const_data_ptr<T>();
    const T* gam = gamma.const_data_ptr<T>();
    const T* ome = omega.const_data_ptr<T>();
    for_each_plane_chunk(s, kPlaneChunk, [&](int64_t plane, int64_t start, int64_t n) {
      const int64_t ch = plane % s.channels, off = plane * s.hw + start;
      ExciteMixArgs<T> a = base;
      a.c2_raw += off;
      a.h += off;
      a.h1 += off;
      a.g2 += off;
      a.out += off;
      if (a.xhat != nullptr) a.xhat += off;
      if (linearize) {
        a.v_to_dc2 += off;
        a.v_to_dh1 += off;
        a.v_to_dm2 += off;
        a.v_to_dh += off;
      }
      a.mean = pn.mean[plane];
      a.invstd = pn.invstd[plane];
      a.weight = pn.weight[ch];
      a.bias = pn.bias[ch];
      a.kappa = kap[ch];
      a.gamma = gam[ch];
      a.omega = ome[ch];
      k.excite_mix(a, n);
    });
  });
  if (!linearize) return {out};
  return {out, xhat, invstd, k_c2, k_h1, k_m2, k_h};
}

// ---------------------------------------------------------------------------------------------
// VJP passes

std::vector<Tensor> vjp_excite_mix(const Tensor& v, const Tensor& v_to_dc2, const Tensor& v_to_dh1,
                                   const Tensor& v_to_dm2, const Tensor& v_to_dh, const Tensor& u2_weight,
                                   const Tensor& dc2_out, const Tensor& dh1_out) {
  const Shape s = shape_of(v);
  Tensor dc2 = out_or_new(dc2_out, v), dh1 = out_or_new(dh1_out, v), dh = alloc_output(v);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "vjp_excite_mix", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const std::vector<T> w_t = transposed<T>(u2_weight);
    const VjpExciteMixArgs<T> base{v.const_data_ptr<T>(),        v_to_dc2.const_data_ptr<T>(),
                                   v_to_dh1.const_data_ptr<T>(), v_to_dm2.const_data_ptr<T>(),
                                   v_to_dh.const_data_ptr<T>(),  dc2.mutable_data_ptr<T>(),
                                   dh1.mutable_data_ptr<T>(),    dh.mutable_data_ptr<T>(),
                                   w_t.data()};
    for_each_tile<T>(s, [&](int64_t b, int64_t p0, int64_t n, T* scratch) {
      const int64_t off = b * s.channels * s.hw + p0;
      VjpExciteMixArgs<T> a = base;
      a.v += off;
      a.v_to_dc2 += off;
      a.v_to_dh1 += off;
      a.v_to_dm2 += off;
      a.v_to_dh += off;
      a.dc2 += off;
      a.dh1 += off;
      a.dh += off;
      k.vjp_excite_mix(a, s.channels, s.hw, n, scratch);
    });
  });
  return {dc2, dh1, dh};
}

std::vector<Tensor> vjp_inhibit(const Tensor& dh1, const Tensor& dh1_extra, const Tensor& dh,
                                const Tensor& dh1_to_dc1, const Tensor& dh1_to_dh, const Tensor& dc1_out,
                                const Tensor& dh_out_buffer) {
  const Shape s = shape_of(dh1);
  Tensor dc1 = out_or_new(dc1_out, dh1), dh_out = out_or_new(dh_out_buffer, dh1);
  AT_DISPATCH_FLOATING_TYPES(dh1.scalar_type(), "vjp_inhibit", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const VjpInhibitArgs<T> base{dh1.const_data_ptr<T>(),
                                 dh1_extra.defined() ? dh1_extra.const_data_ptr<T>() : nullptr,
                                 dh.const_data_ptr<T>(),
                                 dh1_to_dc1.const_data_ptr<T>(),
                                 dh1_to_dh.const_data_ptr<T>(),
                                 dc1.mutable_data_ptr<T>(),
                                 dh_out.mutable_data_ptr<T>()};
    for_each_plane_chunk(s, kPlaneChunk, [&](int64_t plane, int64_t start, int64_t n) {
      const int64_t off = plane * s.hw + start;
      VjpInhibitArgs<T> a = base;
      a.dh1 += off;
      if (a.dh1_extra != nullptr) a.dh1_extra += off;
      a.dh += off;
      a.dh1_to_dc1 += off;
      a.dh1_to_dh += off;
      a.dc1 += off;
      a.dh_out += off;
      k.vjp_inhibit(a, n);
    });
  });
  return {dc1, dh_out};
}

Tensor vjp_gate_inh(const Tensor& dhg, const Tensor& dh, const Tensor& g1, const Tensor& dhg_to_dm1,
                    const Tensor& u1_weight, const Tensor& out_buffer) {
  const Shape s = shape_of(dhg);
  Tensor out = out_or_new(out_buffer, dhg);
  AT_DISPATCH_FLOATING_TYPES(dhg.scalar_type(), "vjp_gate_inh", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const std::vector<T> w_t = transposed<T>(u1_weight);
    const VjpGateInhArgs<T> base{dhg.const_data_ptr<T>(), dh.const_data_ptr<T>(), g1.const_data_ptr<T>(),
                                 dhg_to_dm1.const_data_ptr<T>(), out.mutable_data_ptr<T>(), w_t.data()};
    for_each_tile<T>(s, [&](int64_t b, int64_t p0, int64_t n, T* scratch) {
      const int64_t off = b * s.channels * s.hw + p0;
      VjpGateInhArgs<T> a = base;
      a.dhg += off;
      a.dh += off;
      a.g1 += off;
      a.dhg_to_dm1 += off;
      a.dh_out += off;
      k.vjp_gate_inh(a, s.channels, s.hw, n, scratch);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The FFT conv's channel mix

Tensor spectral_mix(const Tensor& z, const Tensor& spec, bool transpose, const Tensor& out_buffer) {
  static_assert(kMixLanes == kSpectralMixLanes, "the kernel's tile is the layout's");
  const int64_t batch = z.size(0), nx = z.size(1), planes = z.size(2);
  const int64_t ny = transpose ? spec.size(2) : spec.size(1);
  const int64_t tiles = spec.size(0);
  // alloc_output of an expanded one-element tensor: one allocation (NaN-filled under the debug flag).
  Tensor out = out_buffer.defined() ? out_buffer : alloc_output(at::empty({1}, z.options()).expand({batch, ny, planes, 2}));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "spectral_mix", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const int64_t block = spec.size(1) * spec.size(2) * 2 * kMixLanes;
    const int64_t scratch_size = 2 * kMixLanes * (std::min(batch, kMixBatch) * nx + kMixBatch);
    const T* zp = z.const_data_ptr<T>();
    const T* sp = spec.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(static_cast<size_t>(scratch_size));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p0 = t * kMixLanes;
        const SpectralMixArgs<T> a{zp, sp + t * block, op, batch, nx, ny, planes, p0,
                                   std::min(kMixLanes, planes - p0), transpose};
        k.spectral_mix(a, scratch.data());
      }
    });
  });
  return out;
}

Tensor spectral_outer(const Tensor& p, const Tensor& q, std::int64_t rows, const Tensor& out) {
  const int64_t batch = p.size(0), no = p.size(1), nc = q.size(1), planes = p.size(2);
  const int64_t tiles = (planes + kMixLanes - 1) / kMixLanes;
  const int64_t cols = planes / rows;
  Tensor d = out.defined() ? out : alloc_output(at::empty({1}, p.options()).expand({planes, 2 * nc, no}));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "spectral_outer", [&] {
    using T = scalar_t;
    const auto& k = kernels<T>();
    const int64_t scratch_size = 2 * kMixLanes * std::min(batch, kMixBatch) * (no + nc);
    const T* pp = p.const_data_ptr<T>();
    const T* qp = q.const_data_ptr<T>();
    T* dp = d.mutable_data_ptr<T>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(static_cast<size_t>(scratch_size));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p0 = t * kMixLanes;
        const SpectralOuterArgs<T> a{pp, qp, dp, batch, no, nc, planes, rows, cols, p0,
                                     std::min(kMixLanes, planes - p0)};
        k.spectral_outer(a, scratch.data());
      }
    });
  });
  return d;
}

// ---------------------------------------------------------------------------------------------
// The tracked step's plane passes

std::vector<Tensor> plane_pass(int pass, const std::vector<Tensor>& in, const Tensor& scalars, int64_t skip) {
  const PlanePassSpec& spec = kPlanePassSpecs[pass];
  const Tensor& ref = in[0];
  const Shape s = shape_of(ref);
  std::vector<Tensor> out(static_cast<size_t>(spec.n_out));
  for (int o = 0; o < spec.n_out; ++o)
    if (!((skip >> o) & 1)) out[o] = alloc_output(ref);
  const int64_t per_plane = (s.hw + kPlaneChunk - 1) / kPlaneChunk;
  std::vector<double> unit_sums(static_cast<size_t>(s.planes() * per_plane * spec.n_sums));
  AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "plane_pass", [&] {
    using T = scalar_t;
    const auto fn = kernels<T>().plane[pass];
    TORCH_CHECK(fn != nullptr, spec.name, ": no kernel in the ", kernels<T>().isa, " table (plane_passes.h lists a "
                "pass that kernels_impl.h does not)");
    // A None input reads as zeros, so that each kernel is one formula (the term it carries vanishes).
    const std::vector<T> zeros(static_cast<size_t>(std::min(kPlaneChunk, s.hw)), T(0));
    const T* base_in[kPlaneMaxIn] = {};
    T* base_out[kPlaneMaxOut] = {};
    for (int i = 0; i < spec.n_in; ++i) base_in[i] = in[i].defined() ? in[i].const_data_ptr<T>() : nullptr;
    for (int o = 0; o < spec.n_out; ++o) base_out[o] = out[o].defined() ? out[o].mutable_data_ptr<T>() : nullptr;
    const T* scal = scalars.defined() ? scalars.const_data_ptr<T>() : nullptr;
    at::parallel_for(0, s.planes() * per_plane, 1, [&](int64_t begin, int64_t end) {
      // A skipped output is written to this worker's scratch row and dropped.
      std::vector<T> dropped(skip != 0 ? zeros.size() : 0);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t plane = u / per_plane, start = (u % per_plane) * kPlaneChunk;
        const int64_t off = plane * s.hw + start;
        PlaneArgs<T> a{};
        for (int i = 0; i < spec.n_in; ++i) a.in[i] = base_in[i] != nullptr ? base_in[i] + off : zeros.data();
        for (int o = 0; o < spec.n_out; ++o) a.out[o] = base_out[o] != nullptr ? base_out[o] + off : dropped.data();
        a.s = scal != nullptr ? scal + plane * spec.n_scalars : nullptr;
        a.sums = unit_sums.data() + u * spec.n_sums;
        a.n = std::min(kPlaneChunk, s.hw - start);
        fn(a);
      }
    });
  });
  if (spec.n_sums == 0) return out;
  Tensor sums = at::zeros({s.batch, s.channels, spec.n_sums}, ref.options().dtype(at::kDouble));
  double* dst = sums.mutable_data_ptr<double>();
  for (int64_t plane = 0; plane < s.planes(); ++plane)
    for (int64_t j = 0; j < per_plane; ++j)
      for (int k = 0; k < spec.n_sums; ++k) dst[plane * spec.n_sums + k] += unit_sums[(plane * per_plane + j) * spec.n_sums + k];
  out.push_back(sums);
  return out;
}

}  // namespace crbp::cpu
