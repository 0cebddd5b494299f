// C++ tests of the CPU kernels (csrc/ops.h) against the hGRU step composed from ATen reference
// ops (at::conv2d, at::batch_norm / at::group_norm, at::softplus, at::sigmoid), and of their VJP
// against autograd through that composition. Built by CMakeLists.txt, run by ctest: one ctest
// test per group (`test_native_kernels <group>`).
//
// Every output the extension allocates is NaN-filled first (CRBP_FAST_DEBUG_NAN_FILL=1), so an
// element a kernel does not write fails the finiteness check.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "cpu/plane_passes.h"
#include "ops.h"

namespace {

using at::Tensor;
using crbp::ops::OptTensor;

int g_failures = 0;

#define EXPECT(cond, ...)                                      \
  do {                                                         \
    if (!(cond)) {                                             \
      ++g_failures;                                            \
      std::fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                       \
      std::fprintf(stderr, "\n");                              \
    }                                                          \
  } while (0)

// Relative RMSE against the reference, and no NaN / inf.
void expect_close(const Tensor& got, const Tensor& want, double rtol, const std::string& what) {
  EXPECT(got.sizes() == want.sizes(), "%s: shape mismatch", what.c_str());
  if (got.sizes() != want.sizes()) return;
  EXPECT(at::isfinite(got).all().item<bool>(), "%s: non-finite values", what.c_str());
  const Tensor a = got.to(at::kDouble), e = want.to(at::kDouble);
  const double err = (a - e).pow(2).mean().sqrt().item<double>();
  const double scale = e.pow(2).mean().sqrt().item<double>();
  EXPECT(err <= rtol * scale, "%s: relative RMSE %.3e > %.1e", what.c_str(), err / scale, rtol);
}

// Expects `fn` to throw a c10::Error whose message contains `needle`.
void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const c10::Error& err) {
    const std::string msg = err.what();
    EXPECT(msg.find(needle) != std::string::npos, "error message lacks '%s': %s", needle.c_str(),
           msg.substr(0, 300).c_str());
    return;
  }
  EXPECT(false, "no error raised (expected '%s')", needle.c_str());
}

struct Cell {
  std::string norm;
  int64_t groups;
  double eps = 1e-3;
  Tensor u1w, u1b, u2w, u2b, w_inh, w_exc, alpha, mu, kappa, gamma, omega;
  Tensor n1w, n1b, n2w, n2b;  // norm affine, undefined for "none"

  OptTensor opt(const Tensor& t) const { return t.defined() ? OptTensor(t) : std::nullopt; }
};

Cell make_cell(int64_t channels, int64_t k, const std::string& norm, at::ScalarType dtype) {
  const auto o = at::TensorOptions().dtype(dtype);
  Cell cell;
  cell.norm = norm;
  cell.groups = norm == "group" ? channels : 1;
  cell.u1w = at::randn({channels, channels}, o) / std::sqrt(double(channels));
  cell.u2w = at::randn({channels, channels}, o) / std::sqrt(double(channels));
  cell.u1b = at::randn({channels}, o);
  cell.u2b = at::randn({channels}, o);
  cell.w_inh = at::randn({channels, channels, k, k}, o) / double(k * channels);
  cell.w_exc = at::randn({channels, channels, k, k}, o) / double(k * channels);
  cell.alpha = 0.1 + 0.2 * at::randn({channels}, o);
  cell.mu = 1.0 + 0.2 * at::randn({channels}, o);
  cell.kappa = 0.5 + 0.2 * at::randn({channels}, o);
  cell.gamma = 1.0 + 0.2 * at::randn({channels}, o);
  cell.omega = 0.5 + 0.2 * at::randn({channels}, o);
  if (norm != "none") {
    cell.n1w = 1.0 + 0.3 * at::randn({channels}, o);
    cell.n2w = 1.0 + 0.3 * at::randn({channels}, o);
    cell.n1b = 0.3 * at::randn({channels}, o);
    cell.n2b = 0.3 * at::randn({channels}, o);
  }
  return cell;
}

// ---------------------------------------------------------------------------------------------
// The reference: the hGRU step from ATen ops (DESIGN section 2).

Tensor conv_same(const Tensor& x, const Tensor& w) { return at::conv2d(x, w, {}, 1, w.size(-1) / 2); }

Tensor conv_same_transpose(const Tensor& y, const Tensor& w) {
  return at::conv2d(y, w.flip({-1, -2}).transpose(0, 1), {}, 1, w.size(-1) / 2);
}

Tensor norm_ref(const Tensor& c, const Cell& cell, const Tensor& w, const Tensor& b) {
  if (cell.norm == "batch") return at::batch_norm(c, w, b, {}, {}, true, 0.0, cell.eps, false);
  if (cell.norm == "group") return at::group_norm(c, cell.groups, w, b, cell.eps, false);
  return c;
}

Tensor per_channel(const Tensor& p) { return p.reshape({1, -1, 1, 1}); }

Tensor step_ref(const Tensor& x, const Tensor& h, const Cell& cell) {
  const int64_t ch = cell.u1w.size(0);
  const Tensor g1 = at::sigmoid(at::conv2d(h, cell.u1w.reshape({ch, ch, 1, 1}), cell.u1b));
  const Tensor c1 = norm_ref(conv_same(h * g1, cell.w_inh), cell, cell.n1w, cell.n1b);
  const Tensor h1 = at::softplus(x - at::softplus(c1 * (per_channel(cell.alpha) * h + per_channel(cell.mu))));
  const Tensor g2 = at::sigmoid(at::conv2d(h1, cell.u2w.reshape({ch, ch, 1, 1}), cell.u2b));
  const Tensor c2 = norm_ref(conv_same(h1, cell.w_exc), cell, cell.n2w, cell.n2b);
  const Tensor e = per_channel(cell.kappa) * h1 + per_channel(cell.gamma) * c2 + per_channel(cell.omega) * h1 * c2;
  return at::softplus((1 - g2) * h + g2 * at::softplus(e));
}

// ---------------------------------------------------------------------------------------------
// The native passes composed as crbp_fast/hgru/native/hgru.py does.

Tensor step_native(const Tensor& x, const Tensor& h, const Cell& cell) {
  using namespace crbp::ops;
  const Tensor hg = gate_inh(h, cell.u1w, cell.u1b);
  auto [h1, g2] = inhibit(conv_same(hg, cell.w_inh), x, h, cell.norm, cell.opt(cell.n1w), cell.opt(cell.n1b),
                          cell.eps, cell.groups, cell.alpha, cell.mu, cell.u2w, cell.u2b, std::nullopt, std::nullopt);
  return excite_mix(conv_same(h1, cell.w_exc), h, h1, g2, cell.norm, cell.opt(cell.n2w), cell.opt(cell.n2b),
                    cell.eps, cell.groups, cell.kappa, cell.gamma, cell.omega, std::nullopt);
}

// (F(x, h), J^T v) with the linearize and vjp passes; in place as the Python backend runs them.
std::pair<Tensor, Tensor> linearize_vjp_native(const Tensor& x, const Tensor& h, const Cell& cell, const Tensor& v) {
  using namespace crbp::ops;
  const auto gate = linearize_gate_inh(h, cell.u1w, cell.u1b);  // hg, g1, dhg_to_dm1
  const auto inh = linearize_inhibit(conv_same(gate[0], cell.w_inh), x, h, cell.norm, cell.opt(cell.n1w),
                                     cell.opt(cell.n1b), cell.eps, cell.groups, cell.alpha, cell.mu, cell.u2w,
                                     cell.u2b);  // h1, g2, xhat1, invstd1, dh1_to_dc1, dh1_to_dh
  const auto exc = linearize_excite_mix(conv_same(*inh[0], cell.w_exc), h, *inh[0], *inh[1], cell.norm,
                                        cell.opt(cell.n2w), cell.opt(cell.n2b), cell.eps, cell.groups, cell.kappa,
                                        cell.gamma, cell.omega);  // F, xhat2, invstd2, v_to_dc2/dh1/dm2/dh
  auto [dc2, dh1, dh] = vjp_excite_mix(v, *exc[3], *exc[4], *exc[5], *exc[6], cell.u2w, at::empty_like(v),
                                       at::empty_like(v));
  const Tensor dr2 = norm_vjp(dc2, exc[1], exc[2], cell.norm, cell.opt(cell.n2w), cell.groups, dc2);
  auto [dc1, dh_new] =
      vjp_inhibit(dh1, conv_same_transpose(dr2, cell.w_exc), dh, *inh[4], *inh[5], dh1, dh);
  const Tensor dr1 = norm_vjp(dc1, inh[2], inh[3], cell.norm, cell.opt(cell.n1w), cell.groups, dc1);
  const Tensor u =
      vjp_gate_inh(conv_same_transpose(dr1, cell.w_inh), dh_new, gate[1], gate[2], cell.u1w, dh_new);
  return {*exc[0], u};
}

struct Case {
  std::string norm;
  at::ScalarType dtype;
  int64_t k;
};

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (const char* norm : {"batch", "group", "none"})
    for (at::ScalarType dtype : {at::kFloat, at::kDouble})
      for (int64_t k : {3, 5}) cases.push_back({norm, dtype, k});
  return cases;
}

std::string label(const Case& c) {
  return c.norm + "/" + (c.dtype == at::kFloat ? "float32" : "float64") + "/k" + std::to_string(c.k);
}

double rtol(at::ScalarType dtype) { return dtype == at::kFloat ? 2e-5 : 1e-11; }

void check_case(const Case& c, int64_t batch = 3, int64_t channels = 5, int64_t height = 13, int64_t width = 11) {
  at::manual_seed(0);
  const Cell cell = make_cell(channels, c.k, c.norm, c.dtype);
  const auto o = at::TensorOptions().dtype(c.dtype);
  const Tensor x = at::randn({batch, channels, height, width}, o);
  const Tensor h = at::softplus(at::randn({batch, channels, height, width}, o));
  const Tensor v = at::randn({batch, channels, height, width}, o);
  const Tensor h_var = h.detach().requires_grad_(true);
  const Tensor ref = step_ref(x, h_var, cell);
  const Tensor ref_u = torch::autograd::grad({ref}, {h_var}, {v})[0];
  expect_close(step_native(x, h, cell), ref.detach(), rtol(c.dtype), label(c) + " step");
  auto [state, u] = linearize_vjp_native(x, h, cell, v);
  expect_close(state, ref.detach(), rtol(c.dtype), label(c) + " linearize state");
  expect_close(u, ref_u, rtol(c.dtype), label(c) + " vjp");
}

// ---------------------------------------------------------------------------------------------
// Test groups

void test_step_and_vjp() {
  for (const Case& c : all_cases()) check_case(c);
}

void test_threads_and_isa() {
  const std::string isa = crbp::ops::cpu_isa();
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    for (const char* name : {"base", "avx2", "avx512"}) {
      try {
        crbp::ops::set_cpu_isa(name);
      } catch (const c10::Error&) {
        continue;  // this CPU does not run `name`
      }
      check_case({"group", at::kFloat, 3});
      check_case({"batch", at::kDouble, 5}, 2, 4, 131, 129);  // planes above one work chunk
    }
  }
  crbp::ops::set_cpu_isa(isa);
}

void test_channel_counts() {
  for (int64_t channels : {1, 3, 8}) check_case({"batch", at::kDouble, 3}, 2, channels, 9, 7);
}

void test_norm_passes() {
  at::manual_seed(0);
  const Tensor c = at::randn({3, 6, 7, 5}, at::kDouble) * 3 + 10;
  const Tensor w = at::randn({6}, at::kDouble), b = at::randn({6}, at::kDouble);
  expect_close(crbp::ops::normalize(c, "batch", w, b, 1e-3, 1), at::batch_norm(c, w, b, {}, {}, true, 0.0, 1e-3, false),
               1e-12, "normalize batch");
  expect_close(crbp::ops::normalize(c, "group", w, b, 1e-3, 3), at::group_norm(c, 3, w, b, 1e-3, false), 1e-12,
               "normalize group");
  auto [mean, invstd] = crbp::ops::norm_stats(c, "group", 2, 1e-3);
  const Tensor grouped = c.reshape({3, 2, -1});
  const Tensor want_mean = grouped.mean(-1, true).expand({3, 2, 3}).reshape({3, 6});
  expect_close(mean, want_mean, 1e-12, "norm_stats mean");
  const Tensor want_invstd = (grouped.var(-1, false, true) + 1e-3).rsqrt().expand({3, 2, 3}).reshape({3, 6});
  expect_close(invstd, want_invstd, 1e-12, "norm_stats invstd");
}

void test_validation() {
  using namespace crbp::ops;
  at::manual_seed(0);
  const Tensor h = at::randn({2, 3, 5, 4});
  const Tensor w = at::randn({3, 3}), b = at::randn({3});
  expect_error([&] { gate_inh(h.transpose(2, 3), w, b); }, "h: expected a contiguous tensor");
  expect_error([&] { gate_inh(h.to(at::kHalf), w, b); }, "CPU kernels take float32 or float64");
  expect_error([&] { gate_inh(h, w.narrow(0, 0, 2).contiguous(), b); }, "u1_weight: expected shape [3, 3]");
  expect_error([&] { gate_inh(h, w, b.to(at::kDouble)); }, "u1_bias: expected dtype Float");
  expect_error([&] { gate_inh(h.reshape({2, 3, 20}), w, b); }, "h: expected a (B, C, H, W) tensor");
  expect_error([&] { norm_stats(h, "layer", 1, 1e-3); }, "norm kind: expected 'batch', 'group' or 'none'");
  expect_error([&] { norm_stats(h, "group", 2, 1e-3); }, "norm groups: expected a positive divisor of C=3");
  expect_error([&] { normalize(h, "batch", std::nullopt, std::nullopt, 1e-3, 1); }, "norm weight and bias");
  const Tensor g1 = h.clone(), slope = h.clone();
  expect_error([&] { vjp_gate_inh(h, h.clone(), g1, slope, w, g1); }, "out: must not share memory with g1");
  expect_error([&] { vjp_inhibit(h, std::nullopt, h.clone(), g1, slope, std::nullopt, h); },
               "dh_out: must not share memory with dh1");
  expect_error([&] { set_cpu_isa("sse9"); }, "expected 'base', 'avx2' or 'avx512'");
}


// The tracked step's plane passes (csrc/cpu/plane_passes.h): every pass on planes of two work
// chunks plus a partial one, all outputs finite (NaN-filled first), tangent_gate_inh and
// plane_dot against ATen, in both dtypes and on every instruction set this CPU runs (the
// sanitizer build sees each kernel's pointer arithmetic).
void test_plane_passes() {
  using namespace crbp::ops;
  at::manual_seed(0);
  const std::string before = cpu_isa();
  const char* isas[] = {"base", "avx2", "avx512"};
  for (const char* isa : isas) {
    try {
      set_cpu_isa(isa);
    } catch (const c10::Error&) {
      continue;  // this CPU does not run it
    }
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      const auto o = at::TensorOptions().dtype(dtype);
      const std::vector<int64_t> shape = {2, 3, 131, 129};  // 16899 per plane: 8192 + 8192 + 515
      const std::string tag = std::string(isa) + (dtype == at::kFloat ? " float32" : " float64");
      const Tensor a = at::randn(shape, o), b = at::randn(shape, o);
      const std::vector<OptTensor> ab = {a, b};
      const auto dot = plane_pass("plane_dot", ab, std::nullopt, 0);
      expect_close(dot[0]->select(2, 0), a.sum({2, 3}).to(at::kDouble), 1e-6, tag + " plane_dot sum");
      expect_close(dot[0]->select(2, 1), (a * b).sum({2, 3}).to(at::kDouble), 1e-6, tag + " plane_dot sum ab");
      for (int pass = 1; pass < crbp::cpu::kPlanePasses; ++pass) {
        const auto& spec = crbp::cpu::kPlanePassSpecs[pass];
        std::vector<OptTensor> in;
        std::vector<Tensor> kept;
        for (int i = 0; i < spec.n_in; ++i) {
          if ((spec.nullable >> i) & 1 && i % 2 == 1) {
            in.push_back(std::nullopt);  // a None input reads as zeros
          } else {
            kept.push_back(at::rand(shape, o));
            in.push_back(kept.back());
          }
        }
        const OptTensor scalars = spec.n_scalars ? OptTensor(at::rand({2, 3, spec.n_scalars}, o)) : std::nullopt;
        const auto out = plane_pass(spec.name, in, scalars, spec.skippable);
        EXPECT(static_cast<int>(out.size()) == spec.n_out + (spec.n_sums ? 1 : 0), "%s: %zu outputs", spec.name,
               out.size());
        for (int k = 0; k < spec.n_out; ++k) {
          const bool skipped = (spec.skippable >> k) & 1;
          EXPECT(out[k].has_value() != skipped, "%s output %d: skipped %d", spec.name, k, int(skipped));
          if (out[k].has_value())
            EXPECT(at::isfinite(*out[k]).all().item<bool>(), "%s (%s) output %s: non-finite", spec.name,
                   tag.c_str(), spec.out[k]);
        }
        if (spec.n_sums)
          EXPECT(at::isfinite(*out.back()).all().item<bool>(), "%s (%s): non-finite sums", spec.name, tag.c_str());
        if (pass == crbp::cpu::kTangentGateInh) {  // g1_t = g1 (1 - g1) m1, hg_t = w g1 + h g1_t
          const Tensor &w = kept[0], &g1 = kept[1], &h = kept[2], &m1 = kept[3];
          const Tensor g1_t = g1 * (1 - g1) * m1;
          expect_close(*out[0], g1_t, 1e-6, tag + " tangent_gate_inh g1_t");
          expect_close(*out[1], w * g1 + h * g1_t, 1e-6, tag + " tangent_gate_inh hg_t");
        }
      }
    }
  }
  set_cpu_isa(before);
  const Tensor h = at::randn({2, 3, 5, 4});
  const std::vector<OptTensor> two = {h, h};
  expect_error([&] { plane_pass("tangent_gate_inh", two, std::nullopt, 0); }, "expected 4 input maps, got 2");
  expect_error([&] { plane_pass("plane_dot", {h, std::nullopt}, std::nullopt, 0); }, "b: expected a tensor, got None");
}

}  // namespace

int main(int argc, char** argv) {
  setenv("CRBP_FAST_DEBUG_NAN_FILL", "1", 1);
  const std::map<std::string, void (*)()> groups = {
      {"step_and_vjp", test_step_and_vjp}, {"threads_and_isa", test_threads_and_isa},
      {"channel_counts", test_channel_counts}, {"norm_passes", test_norm_passes},
      {"validation", test_validation}, {"plane_passes", test_plane_passes},
  };
  std::vector<std::string> run;
  for (int i = 1; i < argc; ++i) run.push_back(argv[i]);
  if (run.empty())
    for (const auto& [name, fn] : groups) run.push_back(name);
  for (const std::string& name : run) {
    const auto it = groups.find(name);
    if (it == groups.end()) {
      std::fprintf(stderr, "unknown test group '%s'\n", name.c_str());
      return 2;
    }
    const int before = g_failures;
    it->second();
    std::printf("%s: %s\n", name.c_str(), g_failures == before ? "ok" : "FAILED");
  }
  return g_failures == 0 ? 0 : 1;
}
