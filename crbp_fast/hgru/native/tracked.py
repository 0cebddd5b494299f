"""The tracked step's passes as the extension's fused plane passes: what
:mod:`crbp_fast.hgru.tracked` runs for ``backend="native"``.

The composition is :class:`crbp_fast.hgru.plane_tracked.PlanePasses` (same names, arguments and
results as :mod:`crbp_fast.hgru.reference`); this module supplies its kernels: each plane pass
is one kernel over (b, c) planes (``csrc/cpu/plane_impl.h``, through ``_C.plane_pass``), and the
gate, normalisation statistics, norm VJP and gate VJP are the native step's kernels.

CPU (float32, float64) and, in a CUDA build, CUDA (float32: the same kernel bodies as device
functions, one element per thread, csrc/cuda/hgru_cuda.cu). The CUDA passes have not yet run on
a GPU: they are opt-in (``CRBP_FAST_CUDA_TRACKED=1``) until their ``gpu`` tests pass there, and
off under ``torch.use_deterministic_algorithms`` (their per-plane sums are float64 atomics).
Elsewhere the reference passes run. Results equal the reference's up to rounding (the per-plane
sums are taken in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..plane_tracked import CUDA_SWITCH, PlanePasses, cuda_opted_in
from ..reference import NormSpec, lcp_weights
from .hgru import _C, NativeLinearization, _mat, _vec, norm_vjp
from .hgru import Factors as NativeFactors

#: The dtypes of these passes per device (CUDA: when the extension was built with CUDA).
DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32,)}


class _Kernels:
    """The extension's kernels (:class:`crbp_fast.hgru.plane_tracked.PlaneKernels`)."""

    @staticmethod
    def plane_pass(name, maps, scalars=None, skip=0):
        return _C.plane_pass(name, maps, scalars, skip)

    @staticmethod
    def gate_inh(h, p):
        return _C.linearize_gate_inh(h, _mat(p.u1_weight, h), _vec(p.u1_bias, h))

    @staticmethod
    def norm_stats(c_raw, spec):
        return _C.norm_stats(c_raw, spec.kind, spec.groups, spec.eps)

    @staticmethod
    def norm_vjp(dc, xhat, invstd, spec: NormSpec, sums=None):
        return norm_vjp(dc, xhat, invstd, spec)  # one kernel that takes its own sums

    @staticmethod
    def vjp_gate_inh(dhg, dh, g1, hg1_slope, p):
        return _C.vjp_gate_inh(dhg, dh, g1, hg1_slope, _mat(p.u1_weight, dhg), out=dh)

    @staticmethod
    def linearization(p, f, products, invstd, engine):
        dh1_to_dc1, dh1_to_dh, v_to_dc2, v_to_dh1, v_to_dm2, v_to_dh = products
        factors = NativeFactors(
            state=f.state, g1=f.g1, dhg_to_dm1=f.hg1_slope, xhat1=f.xhat1, invstd1=invstd[0], dh1_to_dc1=dh1_to_dc1,
            dh1_to_dh=dh1_to_dh, xhat2=f.xhat2, invstd2=invstd[1], v_to_dc2=v_to_dc2, v_to_dh1=v_to_dh1,
            v_to_dm2=v_to_dm2, v_to_dh=v_to_dh,
        )
        return NativeLinearization.from_factors(p, factors, engine)


PASSES = PlanePasses(_Kernels())
# The passes as this module's functions (the tracked node and lcp_tangent look them up here).
(column_sums, linearization, linearize_tracked, step_vjp, tangent_excite_mix, tangent_gate_inh, tangent_inhibit,
 tangent_vjp_gate_inh, tangent_vjp_inhibit, lcp_tangent) = PASSES.module_functions(__name__)


def supported(x: Tensor) -> bool:
    """Whether these passes run for maps like ``x``: CPU float32 / float64; CUDA float32 with a
    CUDA build of the extension, when ``CRBP_FAST_CUDA_TRACKED=1`` and outside
    ``torch.use_deterministic_algorithms`` (the CUDA sums are float64 atomics, whose order varies)."""
    if x.device.type == "cuda":
        if not _C.with_cuda() or not cuda_opted_in():
            return False
        if torch.are_deterministic_algorithms_enabled():
            return False
    return x.dtype in DTYPES.get(x.device.type, ())


__all__ = [
    "CUDA_SWITCH",
    "PASSES",
    "column_sums",
    "lcp_tangent",
    "lcp_weights",
    "linearization",
    "linearize_tracked",
    "step_vjp",
    "supported",
    "tangent_excite_mix",
    "tangent_gate_inh",
    "tangent_inhibit",
    "tangent_vjp_gate_inh",
    "tangent_vjp_inhibit",
]
