// Argument validation and device dispatch for the hGRU passes (see ops.h). Every check names
// the argument, what was given and what is expected; the implementations behind hgru.h assume
// all of it.
#include "ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/fill.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <limits>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/plane_passes.h"
#include "hgru.h"

namespace crbp {

using at::Tensor;

namespace {

bool debug_nan_fill() {
  const char* env = std::getenv("CRBP_FAST_DEBUG_NAN_FILL");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

at::ScalarType opmath_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

namespace {

// Large CPU outputs are fresh anonymous memory each call (the CPU allocator returns big blocks to
// the system), so a kernel's first write page-faults once per 4 KiB page: ~28 of the 47 ms of a
// 65 MB spectral_outer output at B2-C25-160x81 on one thread. Asking for transparent huge pages
// (2 MiB) on the block's interior makes that a few dozen faults; where THP is off ("never") or
// the call fails, nothing changes. What THP_MEM_ALLOC_ENABLE=1 does for the whole process, for
// these outputs only (the variable is read once, before this package could set it).
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(1) << 21;
  const std::size_t bytes = t.nbytes();
  if (!t.device().is_cpu() || bytes < 2 * kHuge) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advisory only
#else
  (void)t;
#endif
}

}  // namespace

Tensor alloc_output(const Tensor& like) {
  Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
  advise_huge_pages(out);
  if (debug_nan_fill()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

Tensor alloc_stats(const Tensor& like_map) {
  Tensor out = at::empty({like_map.size(0), like_map.size(1)},
                         like_map.options().dtype(opmath_type(like_map.scalar_type())));
  if (debug_nan_fill()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

namespace ops {
namespace {

#ifdef CRBP_WITH_CUDA
#define CRBP_ON_DEVICE(ref, call) ((ref).is_cuda() ? cuda::call : cpu::call)
#else
#define CRBP_ON_DEVICE(ref, call) (cpu::call)
#endif

// A (B, C, H, W) feature map that a kernel reads: the first one of a call fixes device,
// dtype and shape for the others.
void check_map(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.dim() == 4, name, ": expected a (B, C, H, W) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.size(0) > 0 && t.size(1) > 0 && t.size(2) > 0 && t.size(3) > 0, name,
              ": expected non-empty dimensions, got shape ", t.sizes());
  if (t.is_cpu()) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                ": the CPU kernels take float32 or float64, got ", t.scalar_type());
  } else if (t.is_cuda()) {
#ifdef CRBP_WITH_CUDA
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
                ": the CUDA kernels take float32 or bfloat16, got ", t.scalar_type());
#else
    TORCH_CHECK(false, name, ": is on ", t.device(),
                " but crbp_fast.hgru.native was built without CUDA; rebuild it with a CUDA-enabled torch and nvcc "
                "(CRBP_FAST_CUDA=1 pip install --no-build-isolation -e .)");
#endif
  } else {
    TORCH_CHECK(false, name, ": expected a CPU or CUDA tensor, got device ", t.device());
  }
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (call .contiguous()), got strides ",
              t.strides());
}

void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.device() == ref.device(), name, ": expected the device of ", ref_name, " (", ref.device(), "), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected the shape of ", ref_name, " ", ref.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (call .contiguous()), got strides ",
              t.strides());
}

// A small parameter tensor of the given shape in the opmath dtype of the map ref.
void check_param(const Tensor& t, const char* name, at::IntArrayRef shape, const Tensor& ref) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
  const at::ScalarType want = opmath_type(ref.scalar_type());
  TORCH_CHECK(t.scalar_type() == want, name, ": expected dtype ", want, " (the compute dtype of ", ref.scalar_type(),
              " maps), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

void check_vector(const Tensor& t, const char* name, const Tensor& ref) { check_param(t, name, {ref.size(1)}, ref); }

void check_matrix(const Tensor& t, const char* name, const Tensor& ref) {
  check_param(t, name, {ref.size(1), ref.size(1)}, ref);
}

void check_stats(const Tensor& t, const char* name, const Tensor& ref) {
  check_param(t, name, {ref.size(0), ref.size(1)}, ref);
}

NormKind parse_kind(const std::string& kind) {
  if (kind == "batch") return NormKind::kBatch;
  if (kind == "group") return NormKind::kGroup;
  TORCH_CHECK(kind == "none", "norm kind: expected 'batch', 'group' or 'none', got '", kind, "'");
  return NormKind::kNone;
}

void check_groups(NormKind kind, std::int64_t groups, const Tensor& ref) {
  if (kind != NormKind::kGroup) return;
  TORCH_CHECK(groups >= 1 && ref.size(1) % groups == 0, "norm groups: expected a positive divisor of C=", ref.size(1),
              ", got ", groups);
}

// The statistics-only part of a norm (kind, eps, groups): what norm_stats needs.
Norm make_stats_norm(const std::string& kind, std::int64_t groups, double eps, const Tensor& ref) {
  Norm norm;
  norm.kind = parse_kind(kind);
  check_groups(norm.kind, groups, ref);
  TORCH_CHECK(eps >= 0, "norm eps: expected a non-negative number, got ", eps);
  norm.eps = eps;
  norm.groups = norm.kind == NormKind::kGroup ? groups : 1;
  return norm;
}

Norm make_norm(const std::string& kind, const OptTensor& weight, const OptTensor& bias, double eps,
               std::int64_t groups, const Tensor& ref) {
  Norm norm = make_stats_norm(kind, groups, eps, ref);
  if (norm.kind == NormKind::kNone) return norm;
  TORCH_CHECK(weight.has_value() && bias.has_value(), "norm weight and bias: expected tensors for norm '", kind,
              "', got None");
  check_vector(*weight, "norm weight", ref);
  check_vector(*bias, "norm bias", ref);
  norm.weight = *weight;
  norm.bias = *bias;
  return norm;
}

OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

using Named = std::pair<const Tensor*, const char*>;

// A buffer these kernels write in place gets a new version, as an in-place torch op would give
// it: autograd then refuses a saved copy that was overwritten, and anything keyed on the version
// (the FFT engine's transform memo) sees the change. Inference tensors have no counter.
void mark_written(const Tensor& out) {
  if (out.defined() && !out.is_inference()) out.unsafeGetTensorImpl()->bump_version();
}

// An optional output buffer (see ops.h): like ref, and either exactly `may_be` or disjoint from
// it, and disjoint from every tensor in `others`. Returns the buffer, or an undefined tensor.
Tensor check_out(const OptTensor& out, const char* name, const Tensor& ref, const char* ref_name, Named may_be,
                 std::initializer_list<Named> others) {
  if (!out.has_value()) return Tensor();
  check_like(*out, name, ref, ref_name);
  if (may_be.first != nullptr) {
    TORCH_CHECK(at::get_overlap_status(*out, *may_be.first) != at::MemOverlapStatus::Partial, name,
                ": may be ", may_be.second, " itself but must not partially overlap it");
  }
  for (const Named& other : others) {
    if (other.first == nullptr || !other.first->defined()) continue;
    TORCH_CHECK(at::get_overlap_status(*out, *other.first) == at::MemOverlapStatus::No, name,
                ": must not share memory with ", other.second);
  }
  mark_written(*out);
  return *out;
}

// The out buffer of a spectral kernel: ``sizes`` in the dtype and on the device of ``a``,
// contiguous, overlapping neither input; marked written. Undefined when not given.
Tensor check_spectral_out(const OptTensor& out, at::IntArrayRef sizes, const Tensor& a, const char* a_name,
                          const Tensor& b, const char* b_name) {
  if (!out.has_value()) return Tensor();
  const Tensor& o = *out;
  TORCH_CHECK(o.device() == a.device() && o.scalar_type() == a.scalar_type(), "out: expected the device and dtype "
              "of ", a_name, " (", a.device(), " ", a.scalar_type(), "), got ", o.device(), " ", o.scalar_type());
  if (o.sizes() != sizes) {
    std::string want = "(";
    for (std::size_t i = 0; i < sizes.size(); ++i) want += (i ? ", " : "") + std::to_string(sizes[i]);
    TORCH_CHECK(false, "out: expected shape ", want, "), got ", o.sizes());
  }
  TORCH_CHECK(o.is_contiguous(), "out: expected a contiguous tensor, got strides ", o.strides());
  TORCH_CHECK(at::get_overlap_status(o, a) == at::MemOverlapStatus::No &&
                  at::get_overlap_status(o, b) == at::MemOverlapStatus::No,
              "out: must not overlap ", a_name, " or ", b_name);
  mark_written(o);
  return o;
}

}  // namespace

bool with_cuda() {
#ifdef CRBP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_isa() { return cpu::isa(); }

void set_cpu_isa(const std::string& name) { cpu::set_isa(name.c_str()); }

// ---------------------------------------------------------------------------------------------
// Normalisation

std::tuple<Tensor, Tensor> norm_stats(const Tensor& c, const std::string& kind, std::int64_t groups, double eps) {
  check_map(c, "c");
  const Norm norm = make_stats_norm(kind, groups, eps, c);
  TORCH_CHECK(norm.kind != NormKind::kNone, "norm_stats: norm kind 'none' has no statistics");
  return CRBP_ON_DEVICE(c, norm_stats(c, norm));
}

Tensor normalize(const Tensor& c, const std::string& kind, const OptTensor& weight, const OptTensor& bias,
                 double eps, std::int64_t groups) {
  check_map(c, "c");
  const Norm norm = make_norm(kind, weight, bias, eps, groups, c);
  return CRBP_ON_DEVICE(c, normalize(c, norm));
}

Tensor norm_vjp(const Tensor& dy, const OptTensor& xhat, const OptTensor& invstd, const std::string& kind,
                const OptTensor& weight, std::int64_t groups, const OptTensor& out) {
  check_map(dy, "dy");
  Norm norm = make_stats_norm(kind, groups, 0.0, dy);
  if (norm.kind == NormKind::kNone) return dy;
  TORCH_CHECK(xhat.has_value() && invstd.has_value() && weight.has_value(),
              "norm_vjp: expected xhat, invstd and weight for norm '", kind, "', got None");
  check_like(*xhat, "xhat", dy, "dy");
  check_stats(*invstd, "invstd", dy);
  check_vector(*weight, "norm weight", dy);
  norm.weight = *weight;
  const Tensor buffer = check_out(out, "out", dy, "dy", {&dy, "dy"}, {{&*xhat, "xhat"}, {&*invstd, "invstd"}});
  return CRBP_ON_DEVICE(dy, norm_vjp(dy, *xhat, *invstd, norm, buffer));
}

// ---------------------------------------------------------------------------------------------
// Forward and linearize passes

namespace {

void check_gate_inh(const Tensor& h, const Tensor& u1_weight, const Tensor& u1_bias) {
  check_map(h, "h");
  check_matrix(u1_weight, "u1_weight", h);
  check_vector(u1_bias, "u1_bias", h);
}

Norm check_inhibit(const Tensor& c1_raw, const Tensor& x, const Tensor& h, const std::string& kind,
                   const OptTensor& norm_weight, const OptTensor& norm_bias, double eps, std::int64_t groups,
                   const Tensor& alpha, const Tensor& mu, const Tensor& u2_weight, const Tensor& u2_bias) {
  check_map(x, "x");
  check_like(c1_raw, "c1_raw", x, "x");
  check_like(h, "h", x, "x");
  check_vector(alpha, "alpha", x);
  check_vector(mu, "mu", x);
  check_matrix(u2_weight, "u2_weight", x);
  check_vector(u2_bias, "u2_bias", x);
  return make_norm(kind, norm_weight, norm_bias, eps, groups, x);
}

Norm check_excite_mix(const Tensor& c2_raw, const Tensor& h, const Tensor& h1, const Tensor& g2,
                      const std::string& kind, const OptTensor& norm_weight, const OptTensor& norm_bias, double eps,
                      std::int64_t groups, const Tensor& kappa, const Tensor& gamma, const Tensor& omega) {
  check_map(h, "h");
  check_like(c2_raw, "c2_raw", h, "h");
  check_like(h1, "h1", h, "h");
  check_like(g2, "g2", h, "h");
  check_vector(kappa, "kappa", h);
  check_vector(gamma, "gamma", h);
  check_vector(omega, "omega", h);
  return make_norm(kind, norm_weight, norm_bias, eps, groups, h);
}

}  // namespace

Tensor gate_inh(const Tensor& h, const Tensor& u1_weight, const Tensor& u1_bias) {
  check_gate_inh(h, u1_weight, u1_bias);
  return CRBP_ON_DEVICE(h, gate_inh(h, u1_weight, u1_bias, false))[0];
}

std::vector<Tensor> linearize_gate_inh(const Tensor& h, const Tensor& u1_weight, const Tensor& u1_bias) {
  check_gate_inh(h, u1_weight, u1_bias);
  return CRBP_ON_DEVICE(h, gate_inh(h, u1_weight, u1_bias, true));
}

std::tuple<Tensor, Tensor> inhibit(const Tensor& c1_raw, const Tensor& x, const Tensor& h, const std::string& kind,
                                   const OptTensor& norm_weight, const OptTensor& norm_bias, double eps,
                                   std::int64_t groups, const Tensor& alpha, const Tensor& mu,
                                   const Tensor& u2_weight, const Tensor& u2_bias, const OptTensor& h1_out,
                                   const OptTensor& g2_out) {
  const Norm norm =
      check_inhibit(c1_raw, x, h, kind, norm_weight, norm_bias, eps, groups, alpha, mu, u2_weight, u2_bias);
  const Tensor h1_buf = check_out(h1_out, "h1_out", x, "x", {&c1_raw, "c1_raw"}, {{&x, "x"}, {&h, "h"}});
  const Tensor g2_buf = check_out(g2_out, "g2_out", x, "x", {nullptr, nullptr},
                                  {{&c1_raw, "c1_raw"}, {&x, "x"}, {&h, "h"}, {&h1_buf, "h1_out"}});
  auto out = CRBP_ON_DEVICE(x, inhibit(c1_raw, x, h, norm, alpha, mu, u2_weight, u2_bias, false, h1_buf, g2_buf));
  return {out[0], out[1]};
}

std::vector<OptTensor> linearize_inhibit(const Tensor& c1_raw, const Tensor& x, const Tensor& h,
                                         const std::string& kind, const OptTensor& norm_weight,
                                         const OptTensor& norm_bias, double eps, std::int64_t groups,
                                         const Tensor& alpha, const Tensor& mu, const Tensor& u2_weight,
                                         const Tensor& u2_bias) {
  const Norm norm =
      check_inhibit(c1_raw, x, h, kind, norm_weight, norm_bias, eps, groups, alpha, mu, u2_weight, u2_bias);
  std::vector<OptTensor> out;
  for (const Tensor& t :
       CRBP_ON_DEVICE(x, inhibit(c1_raw, x, h, norm, alpha, mu, u2_weight, u2_bias, true, Tensor(), Tensor())))
    out.push_back(optional(t));
  return out;
}

Tensor excite_mix(const Tensor& c2_raw, const Tensor& h, const Tensor& h1, const Tensor& g2, const std::string& kind,
                  const OptTensor& norm_weight, const OptTensor& norm_bias, double eps, std::int64_t groups,
                  const Tensor& kappa, const Tensor& gamma, const Tensor& omega, const OptTensor& out) {
  const Norm norm =
      check_excite_mix(c2_raw, h, h1, g2, kind, norm_weight, norm_bias, eps, groups, kappa, gamma, omega);
  const Tensor buffer =
      check_out(out, "out", h, "h", {&c2_raw, "c2_raw"}, {{&h, "h"}, {&h1, "h1"}, {&g2, "g2"}});
  return CRBP_ON_DEVICE(h, excite_mix(c2_raw, h, h1, g2, norm, kappa, gamma, omega, false, buffer))[0];
}

std::vector<OptTensor> linearize_excite_mix(const Tensor& c2_raw, const Tensor& h, const Tensor& h1,
                                            const Tensor& g2, const std::string& kind,
                                            const OptTensor& norm_weight, const OptTensor& norm_bias, double eps,
                                            std::int64_t groups, const Tensor& kappa, const Tensor& gamma,
                                            const Tensor& omega) {
  const Norm norm =
      check_excite_mix(c2_raw, h, h1, g2, kind, norm_weight, norm_bias, eps, groups, kappa, gamma, omega);
  std::vector<OptTensor> out;
  for (const Tensor& t :
       CRBP_ON_DEVICE(h, excite_mix(c2_raw, h, h1, g2, norm, kappa, gamma, omega, true, Tensor())))
    out.push_back(optional(t));
  return out;
}

// ---------------------------------------------------------------------------------------------
// VJP passes

std::tuple<Tensor, Tensor, Tensor> vjp_excite_mix(const Tensor& v, const Tensor& v_to_dc2, const Tensor& v_to_dh1,
                                                  const Tensor& v_to_dm2, const Tensor& v_to_dh,
                                                  const Tensor& u2_weight, const OptTensor& dc2_out,
                                                  const OptTensor& dh1_out) {
  check_map(v, "v");
  check_like(v_to_dc2, "v_to_dc2", v, "v");
  check_like(v_to_dh1, "v_to_dh1", v, "v");
  check_like(v_to_dm2, "v_to_dm2", v, "v");
  check_like(v_to_dh, "v_to_dh", v, "v");
  check_matrix(u2_weight, "u2_weight", v);
  const std::initializer_list<Named> inputs = {
      {&v, "v"}, {&v_to_dc2, "v_to_dc2"}, {&v_to_dh1, "v_to_dh1"}, {&v_to_dm2, "v_to_dm2"}, {&v_to_dh, "v_to_dh"}};
  const Tensor dc2_buf = check_out(dc2_out, "dc2_out", v, "v", {nullptr, nullptr}, inputs);
  const Tensor dh1_buf = check_out(dh1_out, "dh1_out", v, "v", {nullptr, nullptr}, inputs);
  if (dc2_buf.defined() && dh1_buf.defined()) {
    TORCH_CHECK(at::get_overlap_status(dc2_buf, dh1_buf) == at::MemOverlapStatus::No,
                "dh1_out: must not share memory with dc2_out");
  }
  auto out = CRBP_ON_DEVICE(v, vjp_excite_mix(v, v_to_dc2, v_to_dh1, v_to_dm2, v_to_dh, u2_weight, dc2_buf, dh1_buf));
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> vjp_inhibit(const Tensor& dh1, const OptTensor& dh1_extra, const Tensor& dh,
                                       const Tensor& dh1_to_dc1, const Tensor& dh1_to_dh, const OptTensor& dc1_out,
                                       const OptTensor& dh_out) {
  check_map(dh1, "dh1");
  if (dh1_extra.has_value()) check_like(*dh1_extra, "dh1_extra", dh1, "dh1");
  check_like(dh, "dh", dh1, "dh1");
  check_like(dh1_to_dc1, "dh1_to_dc1", dh1, "dh1");
  check_like(dh1_to_dh, "dh1_to_dh", dh1, "dh1");
  const Tensor extra = dh1_extra.value_or(Tensor());
  const Tensor dc1_buf = check_out(dc1_out, "dc1_out", dh1, "dh1", {&dh1, "dh1"},
                                   {{&extra, "dh1_extra"}, {&dh, "dh"}, {&dh1_to_dc1, "dh1_to_dc1"},
                                    {&dh1_to_dh, "dh1_to_dh"}});
  const Tensor dh_buf = check_out(dh_out, "dh_out", dh1, "dh1", {&dh, "dh"},
                                  {{&dh1, "dh1"}, {&extra, "dh1_extra"}, {&dh1_to_dc1, "dh1_to_dc1"},
                                   {&dh1_to_dh, "dh1_to_dh"}, {&dc1_buf, "dc1_out"}});
  auto out = CRBP_ON_DEVICE(dh1, vjp_inhibit(dh1, extra, dh, dh1_to_dc1, dh1_to_dh, dc1_buf, dh_buf));
  return {out[0], out[1]};
}

Tensor vjp_gate_inh(const Tensor& dhg, const Tensor& dh, const Tensor& g1, const Tensor& dhg_to_dm1,
                    const Tensor& u1_weight, const OptTensor& out) {
  check_map(dhg, "dhg");
  check_like(dh, "dh", dhg, "dhg");
  check_like(g1, "g1", dhg, "dhg");
  check_like(dhg_to_dm1, "dhg_to_dm1", dhg, "dhg");
  check_matrix(u1_weight, "u1_weight", dhg);
  const Tensor buffer = check_out(out, "out", dhg, "dhg", {&dh, "dh"},
                                  {{&dhg, "dhg"}, {&g1, "g1"}, {&dhg_to_dm1, "dhg_to_dm1"}});
  return CRBP_ON_DEVICE(dhg, vjp_gate_inh(dhg, dh, g1, dhg_to_dm1, u1_weight, buffer));
}

Tensor spectral_mix(const Tensor& z, const Tensor& spec, bool transpose, const OptTensor& out) {
  TORCH_CHECK(z.defined(), "z: expected a tensor, got None");
  TORCH_CHECK(z.dim() == 4 && z.size(3) == 2, "z: expected a (B, X, P, 2) tensor (the real view of a complex "
              "(B, X, P) spectrum), got shape ", z.sizes());
  TORCH_CHECK(z.size(0) > 0 && z.size(1) > 0 && z.size(2) > 0, "z: expected non-empty dimensions, got shape ",
              z.sizes());
  TORCH_CHECK(z.is_cpu() || z.is_cuda(), "z: expected a CPU or CUDA tensor, got device ", z.device());
#ifndef CRBP_WITH_CUDA
  TORCH_CHECK(z.is_cpu(), "z: is on ", z.device(), " but crbp_fast.hgru.native was built without CUDA");
#endif
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "z: expected float32 or float64 (the real view of complex64 / complex128), got ", z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), "z: expected a contiguous tensor, got strides ", z.strides());
  TORCH_CHECK(spec.defined(), "spec: expected a tensor, got None");
  TORCH_CHECK(spec.device() == z.device(), "spec: expected the device of z (", z.device(), "), got ", spec.device());
  TORCH_CHECK(spec.scalar_type() == z.scalar_type(), "spec: expected the dtype of z (", z.scalar_type(), "), got ",
              spec.scalar_type());
  const std::int64_t lanes = kSpectralMixLanes;
  const std::int64_t tiles = (z.size(2) + lanes - 1) / lanes;
  TORCH_CHECK(spec.dim() == 5 && spec.size(0) == tiles && spec.size(3) == 2 && spec.size(4) == lanes,
              "spec: expected shape (", tiles, ", O, C, 2, ", lanes, ") for P = ", z.size(2),
              " frequencies in tiles of ", lanes, ", got ", spec.sizes());
  const std::int64_t in_ch = transpose ? spec.size(1) : spec.size(2);
  TORCH_CHECK(z.size(1) == in_ch, "z: expected ", in_ch, " channels (spec's ",
              transpose ? "output channels O, transpose=True" : "input channels C, transpose=False", "), got ",
              z.size(1));
  TORCH_CHECK(spec.is_contiguous(), "spec: expected a contiguous tensor, got strides ", spec.strides());
  const std::int64_t out_ch = transpose ? spec.size(2) : spec.size(1);
  const Tensor buffer = check_spectral_out(out, {z.size(0), out_ch, z.size(2), 2}, z, "z", spec, "spec");
  return CRBP_ON_DEVICE(z, spectral_mix(z, spec, transpose, buffer));
}

Tensor spectral_outer(const Tensor& p, const Tensor& q, std::int64_t rows, const OptTensor& out) {
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&p, "p"}, {&q, "q"}}) {
    TORCH_CHECK(t->defined(), name, ": expected a tensor, got None");
    TORCH_CHECK(t->dim() == 4 && t->size(3) == 2, name, ": expected a (B, X, P, 2) tensor (the real view of a "
                "complex (B, X, P) spectrum), got shape ", t->sizes());
    TORCH_CHECK(t->size(0) > 0 && t->size(1) > 0 && t->size(2) > 0, name, ": expected non-empty dimensions, got "
                "shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, name,
                ": expected float32 or float64, got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), name, ": expected a contiguous tensor, got strides ", t->strides());
  }
  TORCH_CHECK(p.is_cpu() || p.is_cuda(), "p: expected a CPU or CUDA tensor, got device ", p.device());
#ifndef CRBP_WITH_CUDA
  TORCH_CHECK(p.is_cpu(), "p: is on ", p.device(), " but crbp_fast.hgru.native was built without CUDA");
#endif
  TORCH_CHECK(q.device() == p.device() && q.scalar_type() == p.scalar_type(), "q: expected the device and dtype of p (",
              p.device(), " ", p.scalar_type(), "), got ", q.device(), " ", q.scalar_type());
  TORCH_CHECK(q.size(0) == p.size(0) && q.size(2) == p.size(2), "q: expected the batch and frequencies of p ",
              p.sizes(), ", got ", q.sizes());
  TORCH_CHECK(rows > 0 && p.size(2) % rows == 0, "rows: expected a positive divisor of P = ", p.size(2),
              " (the FFT height M of P = M (N/2 + 1) frequencies), got ", rows);
  const Tensor buffer = check_spectral_out(out, {p.size(2), 2 * q.size(1), p.size(1)}, p, "p", q, "q");
  return CRBP_ON_DEVICE(p, spectral_outer(p, q, rows, buffer));
}

// ---------------------------------------------------------------------------------------------
// The tracked step's plane passes

std::vector<OptTensor> plane_pass(const std::string& name, const std::vector<OptTensor>& in,
                                  const OptTensor& scalars, std::int64_t skip) {
  int pass = -1;
  std::string names;
  for (int i = 0; i < cpu::kPlanePasses; ++i) {
    if (name == cpu::kPlanePassSpecs[i].name) pass = i;
    names += std::string(i ? ", " : "") + cpu::kPlanePassSpecs[i].name;
  }
  TORCH_CHECK(pass >= 0, "plane_pass: expected one of ", names, ", got '", name, "'");
  const cpu::PlanePassSpec& spec = cpu::kPlanePassSpecs[pass];
  TORCH_CHECK(static_cast<int>(in.size()) == spec.n_in, name, ": expected ", spec.n_in, " input maps, got ",
              in.size());
  TORCH_CHECK(in[0].has_value(), name, ": ", spec.in[0], ": expected a tensor, got None");
  const Tensor& ref = *in[0];
  check_map(ref, spec.in[0]);
  if (ref.is_cuda()) {
    TORCH_CHECK(ref.scalar_type() == at::kFloat, name, ": the CUDA plane passes take float32, got ",
                ref.scalar_type());
  }
  std::vector<Tensor> maps(in.size());
  for (int i = 0; i < spec.n_in; ++i) {
    if (!in[i].has_value()) {
      TORCH_CHECK((spec.nullable >> i) & 1, name, ": ", spec.in[i], ": expected a tensor, got None");
      continue;
    }
    check_like(*in[i], spec.in[i], ref, spec.in[0]);
    maps[i] = *in[i];
  }
  Tensor scal;
  if (spec.n_scalars == 0) {
    TORCH_CHECK(!scalars.has_value(), name, ": scalars: expected None (the pass has no per-plane scalars), got a "
                "tensor of shape ", scalars->sizes());
  } else {
    TORCH_CHECK(scalars.has_value(), name, ": scalars: expected a (B, C, ", spec.n_scalars, ") tensor, got None");
    check_param(*scalars, "scalars", {ref.size(0), ref.size(1), spec.n_scalars}, ref);
    scal = *scalars;
  }
  const std::int64_t all = (std::int64_t(1) << spec.n_out) - 1;
  TORCH_CHECK(skip >= 0 && (skip & ~static_cast<std::int64_t>(spec.skippable) & all) == 0 && skip <= all, name,
              ": skip: expected a mask of the skippable outputs (", static_cast<std::int64_t>(spec.skippable),
              "), got ", skip);
  std::vector<OptTensor> out;
  for (const Tensor& t : CRBP_ON_DEVICE(ref, plane_pass(pass, maps, scal, skip))) out.push_back(optional(t));
  return out;
}

}  // namespace ops
}  // namespace crbp
