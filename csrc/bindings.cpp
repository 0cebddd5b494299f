// crbp_fast.hgru.native._C: the pybind11 module over the validated entry points of ops.h.
// Python-side wrappers with reference-compatible signatures live in crbp_fast/hgru/native/hgru.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

namespace py = pybind11;
using namespace crbp::ops;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused hGRU passes (C++ on CPU, CUDA on GPU); see crbp_fast/hgru/reference.py for the math.";
  m.def("with_cuda", &with_cuda, "Whether the extension was built with its CUDA kernels.");
  m.def("cpu_isa", &cpu_isa, "The instruction set the CPU kernels run with: 'avx512', 'avx2' or 'base'.");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Run the CPU kernels with 'avx512', 'avx2' or 'base' (the default comes from the CPU and CRBP_FAST_CPU_ISA).");

  m.def("norm_stats", &norm_stats, py::arg("c"), py::arg("kind"), py::arg("groups"), py::arg("eps"),
        "Per-(b, c) mean and invstd, each (B, C), over the norm's reduction set.");
  m.def("normalize", &normalize, py::arg("c"), py::arg("kind"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("groups"));
  m.def("norm_vjp", &norm_vjp, py::arg("dy"), py::arg("xhat"), py::arg("invstd"), py::arg("kind"),
        py::arg("weight"), py::arg("groups"), py::arg("out") = py::none(), "out may be dy");

  m.def("gate_inh", &gate_inh, py::arg("h"), py::arg("u1_weight"), py::arg("u1_bias"));
  m.def("inhibit", &inhibit, py::arg("c1_raw"), py::arg("x"), py::arg("h"), py::arg("kind"), py::arg("norm_weight"),
        py::arg("norm_bias"), py::arg("eps"), py::arg("groups"), py::arg("alpha"), py::arg("mu"),
        py::arg("u2_weight"), py::arg("u2_bias"), py::arg("h1_out") = py::none(), py::arg("g2_out") = py::none(),
        "(h1, g2); h1_out may be c1_raw");
  m.def("excite_mix", &excite_mix, py::arg("c2_raw"), py::arg("h"), py::arg("h1"), py::arg("g2"), py::arg("kind"),
        py::arg("norm_weight"), py::arg("norm_bias"), py::arg("eps"), py::arg("groups"), py::arg("kappa"),
        py::arg("gamma"), py::arg("omega"), py::arg("out") = py::none(), "F; out may be c2_raw");

  m.def("linearize_gate_inh", &linearize_gate_inh, py::arg("h"), py::arg("u1_weight"), py::arg("u1_bias"),
        "[hg, g1, dhg_to_dm1]");
  m.def("linearize_inhibit", &linearize_inhibit, py::arg("c1_raw"), py::arg("x"), py::arg("h"), py::arg("kind"),
        py::arg("norm_weight"), py::arg("norm_bias"), py::arg("eps"), py::arg("groups"), py::arg("alpha"),
        py::arg("mu"), py::arg("u2_weight"), py::arg("u2_bias"),
        "[h1, g2, xhat1, invstd1, dh1_to_dc1, dh1_to_dh] (xhat1, invstd1 None for norm 'none')");
  m.def("linearize_excite_mix", &linearize_excite_mix, py::arg("c2_raw"), py::arg("h"), py::arg("h1"),
        py::arg("g2"), py::arg("kind"), py::arg("norm_weight"), py::arg("norm_bias"), py::arg("eps"),
        py::arg("groups"), py::arg("kappa"), py::arg("gamma"), py::arg("omega"),
        "[F, xhat2, invstd2, v_to_dc2, v_to_dh1, v_to_dm2, v_to_dh] (xhat2, invstd2 None for norm 'none')");

  m.def("vjp_excite_mix", &vjp_excite_mix, py::arg("v"), py::arg("v_to_dc2"), py::arg("v_to_dh1"),
        py::arg("v_to_dm2"), py::arg("v_to_dh"), py::arg("u2_weight"), py::arg("dc2_out") = py::none(),
        py::arg("dh1_out") = py::none(), "(dc2, dh1 without the exc-conv term, dh)");
  m.def("vjp_inhibit", &vjp_inhibit, py::arg("dh1"), py::arg("dh1_extra"), py::arg("dh"), py::arg("dh1_to_dc1"),
        py::arg("dh1_to_dh"), py::arg("dc1_out") = py::none(), py::arg("dh_out") = py::none(),
        "(dc1, dh); dc1_out may be dh1, dh_out may be dh");
  m.def("vjp_gate_inh", &vjp_gate_inh, py::arg("dhg"), py::arg("dh"), py::arg("g1"), py::arg("dhg_to_dm1"),
        py::arg("u1_weight"), py::arg("out") = py::none(), "the final dh; out may be dh");

  m.def("spectral_mix", &spectral_mix, py::arg("z"), py::arg("spec"), py::arg("transpose"),
        py::arg("out") = py::none(),
        "The FFT conv's channel mix: z (B, X, P, 2), spec (ceil(P / 32), O, C, 2, 32) -> (B, Y, P, 2)");
  m.def("spectral_outer", &spectral_outer, py::arg("p"), py::arg("q"), py::arg("rows"),
        py::arg("out") = py::none(),
        "The FFT conv's spectrum gradient: sum_b p[b, o] conj(q[b, c]) per frequency, as S (P, 2C, O)");
  m.def("plane_pass", &plane_pass, py::arg("name"), py::arg("maps"), py::arg("scalars") = py::none(),
        py::arg("skip") = 0,
        "One of the tracked step's plane passes (csrc/cpu/plane_passes.h): [outputs..., (B, C, n_sums) sums]");
}
