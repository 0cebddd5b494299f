// The plane passes of the tracked step (crbp_fast/hgru/reference.py: linearize_tracked,
// column_sums, step_vjp and the five passes of lcp_tangent; native_factors turns its factors into
// the native VJP's, crbp_fast/hgru/native/hgru.py): elementwise passes over (b, c) planes with per-plane scalars and
// per-plane sums, the 1x1 mixes and convolutions left to the caller (crbp_fast/hgru/native/
// tracked.py). One entry point runs them all (ops.cpp: plane_pass), so each pass is a row of the
// table below and one kernel in plane_impl.h, not a new binding.
//
// Shared by ops.cpp (validation), hgru_cpu.cpp (the driver) and the per-ISA kernel objects, so it
// holds only data: names of the inputs and outputs (the argument lists ops.cpp checks), which
// inputs may be None, how many per-plane scalars a pass reads and sums it writes.
#pragma once

#include <cstdint>

namespace crbp::cpu {

enum PlanePass : int {
  // sums (a, a b) per plane: the statistics a normalisation's tangent needs before its apply.
  kPlaneDot = 0,
  kTangentGateInh,
  kTangentInhibit,
  kTangentExciteMix,
  kNormVjpTangent,
  kTangentVjpInhibit,
  kTangentVjpGateInh,
  kTrackedInhibit,
  kTrackedExciteMix,
  kColumnSumsExciteMix,
  kColumnSumsInhibit,
  kStepVjpExciteMix,
  kStepVjpInhibit,
  kNativeFactors,
  kPlanePasses,
};

constexpr int kPlaneMaxIn = 18;
constexpr int kPlaneMaxOut = 9;
constexpr int kPlaneMaxSums = 6;

struct PlanePassSpec {
  const char* name;
  int n_in, n_out, n_scalars, n_sums;
  const char* in[kPlaneMaxIn];
  const char* out[kPlaneMaxOut];
  unsigned nullable;   // bit i: input i may be None
  unsigned skippable;  // bit i: output i may be skipped (the caller's skip mask)
};

// Input and output indices of each pass, in the order of the table's names.
namespace tgi { enum { w, g1, h, m1 }; enum { g1_t, hg_t }; }
namespace tin {
enum { c1_raw_t, xhat1, dc1_coef, c1, w, s_q, s_r };
enum { xhat1_t, c1_t, q_t, r_t, h1_t };
enum { invstd, mean_t, mean_xt, weight, alpha };  // scalars
}  // namespace tin
namespace tex {
enum { c2_raw_t, xhat2, w, h1_t, g2_t, c2, h1, s_e, g2, hh_minus_h, s_z, v, dz, de, dc2_coef, dh1_coef, g2_slope, dc2 };
enum { xhat2_t, dc2_t, dh1_t, dh_t, dm2_t };
enum { invstd, mean_t, mean_xt, weight, kappa, gamma, omega };                 // scalars
enum { s_kappa, s_gamma, s_omega, s_dc_xhat_t, s_dc_t, s_dc_xhat };            // sums
}  // namespace tex
namespace nvt {
enum { dr, dc_t, xhat_t, xhat };
enum { dr_t };
enum { rel_t, invstd, weight, mean_dxh_t, mean_dxh_xhat, mean_mixed };  // scalars
}  // namespace nvt
namespace tvi {
enum { dh1_t, dh1_t_extra, s_r, r_t, s_q, q_t, dh1, dq_coef, dc1_coef, dq, w, c1, c1_t, h, dh_t, xhat1, dc1, xhat1_t };
enum { dx, dh_t_out, dc1_t };
enum { alpha };                                                 // scalars
enum { s_alpha, s_mu, s_dc_xhat_t, s_dc_t, s_dc_xhat };         // sums
}  // namespace tvi
namespace tvg { enum { dhg_t, dhg, hg1_slope, w, g1, h, g1_t, dh_t }; enum { dm1_t, dm1, dh_t_out }; }
namespace tri {
enum { c1_raw, x, h };
enum { c1, xhat1, dc1_coef, s_q, s_r, dq_coef, dh_q_coef, h1 };
enum { mean, invstd, weight, bias, alpha, mu };  // scalars
}  // namespace tri
namespace trx {
enum { c2_raw, h, h1, g2 };
enum { state, s_z, hh_minus_h, s_e, dc2_coef, dh1_coef, g2_slope, xhat2, c2 };
enum { mean, invstd, weight, bias, kappa, gamma, omega };  // scalars
}  // namespace trx
namespace cse { enum { s_z, g2, s_e, hh_minus_h, g2_slope, dc2_coef }; enum { de, dm2, dc2 }; }
namespace csi {
enum { de, dh1_coef, dh1_mix, dh1_conv, dq_coef, dc1_coef, s_z, g2, dh_q_coef };
enum { dh1, dq, dc1, dh };
}  // namespace csi
namespace sve {
enum { v, s_z, g2, s_e, hh_minus_h, g2_slope, dc2_coef, dh1_coef, h1, c2, xhat2 };
enum { dm2, dc2, dh1, dh };
enum { s_kappa, s_gamma, s_omega, s_dc_xhat, s_dc, s_dm2 };  // sums
}  // namespace sve
namespace svi {
enum { dh1, dh1_extra, s_r, dq_coef, dc1_coef, c1, h, dh, xhat1 };
enum { dx, dc1, dh_out };
enum { alpha };                                 // scalars
enum { s_alpha, s_mu, s_dc_xhat, s_dc };        // sums
}  // namespace svi
namespace nfa {
enum { dq_coef, dc1_coef, dh_q_coef, s_z, g2, s_e, dc2_coef, dh1_coef, hh_minus_h, g2_slope };
enum { dh1_to_dc1, dh1_to_dh, v_to_dc2, v_to_dh1, v_to_dm2, v_to_dh };
}  // namespace nfa

constexpr PlanePassSpec kPlanePassSpecs[kPlanePasses] = {
    {"plane_dot", 2, 0, 0, 2, {"a", "b"}, {}, 0u, 0u},
    {"tangent_gate_inh", 4, 2, 0, 0, {"w", "g1", "h", "m1"}, {"g1_t", "hg_t"}, 0u, 0u},
    {"tangent_inhibit", 7, 5, 5, 0,
     {"c1_raw_t", "xhat1", "dc1_coef", "c1", "w", "s_q", "s_r"},
     {"xhat1_t", "c1_t", "q_t", "r_t", "h1_t"}, 1u << tin::xhat1, (1u << tin::xhat1_t) | (1u << tin::c1_t)},
    {"tangent_excite_mix", 18, 5, 7, 6,
     {"c2_raw_t", "xhat2", "w", "h1_t", "g2_t", "c2", "h1", "s_e", "g2", "hh_minus_h", "s_z", "v", "dz", "de",
      "dc2_coef", "dh1_coef", "g2_slope", "dc2"},
     {"xhat2_t", "dc2_t", "dh1_t", "dh_t", "dm2_t"}, (1u << tex::xhat2) | (1u << tex::v), 1u << tex::xhat2_t},
    {"norm_vjp_tangent", 4, 1, 6, 0, {"dr", "dc_t", "xhat_t", "xhat"}, {"dr_t"}, 0u, 0u},
    {"tangent_vjp_inhibit", 18, 3, 1, 5,
     {"dh1_t", "dh1_t_extra", "s_r", "r_t", "s_q", "q_t", "dh1", "dq_coef", "dc1_coef", "dq", "w", "c1", "c1_t", "h",
      "dh_t", "xhat1", "dc1", "xhat1_t"},
     {"dx", "dh_t", "dc1_t"}, (1u << tvi::dh1_t_extra) | (1u << tvi::xhat1), 0u},
    {"tangent_vjp_gate_inh", 8, 3, 0, 0, {"dhg_t", "dhg", "hg1_slope", "w", "g1", "h", "g1_t", "dh_t"},
     {"dm1_t", "dm1", "dh_t"}, 0u, 0u},
    {"tracked_inhibit", 3, 8, 6, 0, {"c1_raw", "x", "h"},
     {"c1", "xhat1", "dc1_coef", "s_q", "s_r", "dq_coef", "dh_q_coef", "h1"}, 0u,
     (1u << tri::c1) | (1u << tri::xhat1)},
    {"tracked_excite_mix", 4, 9, 7, 0, {"c2_raw", "h", "h1", "g2"},
     {"state", "s_z", "hh_minus_h", "s_e", "dc2_coef", "dh1_coef", "g2_slope", "xhat2", "c2"}, 0u,
     (1u << trx::xhat2) | (1u << trx::c2)},
    {"column_sums_excite_mix", 6, 3, 0, 0, {"s_z", "g2", "s_e", "hh_minus_h", "g2_slope", "dc2_coef"},
     {"de", "dm2", "dc2"}, 0u, 0u},
    {"column_sums_inhibit", 9, 4, 0, 0,
     {"de", "dh1_coef", "dh1_mix", "dh1_conv", "dq_coef", "dc1_coef", "s_z", "g2", "dh_q_coef"},
     {"dh1", "dq", "dc1", "dh"}, 0u, 0u},
    {"step_vjp_excite_mix", 11, 4, 0, 6,
     {"v", "s_z", "g2", "s_e", "hh_minus_h", "g2_slope", "dc2_coef", "dh1_coef", "h1", "c2", "xhat2"},
     {"dm2", "dc2", "dh1", "dh"}, 1u << sve::xhat2, 0u},
    {"step_vjp_inhibit", 9, 3, 1, 4, {"dh1", "dh1_extra", "s_r", "dq_coef", "dc1_coef", "c1", "h", "dh", "xhat1"},
     {"dx", "dc1", "dh"}, (1u << svi::dh1_extra) | (1u << svi::xhat1), 0u},
    {"native_factors", 10, 6, 0, 0,
     {"dq_coef", "dc1_coef", "dh_q_coef", "s_z", "g2", "s_e", "dc2_coef", "dh1_coef", "hh_minus_h", "g2_slope"},
     {"dh1_to_dc1", "dh1_to_dh", "v_to_dc2", "v_to_dh1", "v_to_dm2", "v_to_dh"}, 0u, 0u},
};

// One chunk of one plane: inputs and outputs offset to the chunk (a None input or skipped
// output is nullptr), the plane's scalars, and the chunk's sums to write (n_sums doubles).
template <typename T>
struct PlaneArgs {
  const T* in[kPlaneMaxIn];
  T* out[kPlaneMaxOut];
  const T* s;
  double* sums;
  std::int64_t n;
};

}  // namespace crbp::cpu
