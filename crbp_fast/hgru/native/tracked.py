"""The tracked step's passes as fused plane passes: what :mod:`crbp_fast.hgru.tracked` runs for
``backend="native"``.

Same names, arguments and results as :mod:`crbp_fast.hgru.reference` (where the math is written
out): :func:`linearize_tracked`, :func:`column_sums`, :func:`step_vjp` and the five passes of
:func:`~crbp_fast.hgru.reference.lcp_tangent` (:func:`tangent_gate_inh` ...
:func:`tangent_vjp_gate_inh`; :func:`lcp_tangent` is the reference's composition of these). Each
pass is one kernel over (b, c) planes (``csrc/cpu/plane_impl.h``) instead of tens of eager ops:
every elementwise term of the pass and the per-plane sums of its parameter gradients and of its
normalisation's statistics (in float64) in one read of its maps; where a normalisation's tangent
needs set means first, a reduction over two maps runs before it (``plane_dot``) and its VJP's
tangent after it (``norm_vjp_tangent``), so ``tangent_excite_mix`` is three kernels. The rest stays in torch,
as in the reference: the 1x1 mixes and pixel outer products (GEMMs), the convs (the conv engine),
the reduction of the per-plane sums over each normalisation set ((B, C) arrays), and the gate
g2 = sigma(U2 h1 + b2) of the forward.

Memory traffic of the tangent's elementwise work, in (B, C, H, W) maps read or written (norm
"batch", the 1x1 mixes and pixel outer products included): about 113, against roughly 500 for the
reference's ~200 eager ops (each reads one or two maps and writes one).

CPU (float32, float64) and, in a CUDA build, CUDA (float32: the same kernel bodies as device
functions, one element per thread, csrc/cuda/hgru_cuda.cu). The CUDA passes have not yet run on
a GPU: they are opt-in (``CRBP_FAST_CUDA_TRACKED=1``) until their ``gpu`` tests pass there, and
off under ``torch.use_deterministic_algorithms`` (their per-plane sums are float64 atomics).
Elsewhere the reference passes run. Results equal the reference's up to rounding (the per-plane
sums are taken in float64).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..reference import (ColumnSumMaps, ConvFn, ExciteTangent, Factors, HGRUParams, InhibitTangent, NormSpec,
                         StepGrads, Tracked, VjpInhibitTangent, _mix, _mix_t, _pixel_outer, conv_same,
                         conv_same_transpose, conv_same_weight_grad, lcp_weights)
from .hgru import Factors as NativeFactors
from .hgru import NativeLinearization, _C, _bcast_stats, _mat, _opmath, _vec, norm_vjp

#: The dtypes of these passes per device (CUDA: when the extension was built with CUDA).
DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32,)}


def _pass(name: str, maps: list[Tensor | None], scalars: Tensor | None = None, skip: int = 0) -> list:
    return _C.plane_pass(name, [None if m is None else m.detach().contiguous() for m in maps], scalars, skip)


def _per_plane(values: list, like: Tensor) -> Tensor:
    """(B, C, S) scalars in the compute dtype: each value a per-channel parameter ((C,) or
    (C, 1, 1)), per-plane statistics ((B, C), (1, C, 1, 1) or (B, C, 1, 1)) or a number."""
    b, c = like.shape[:2]
    dtype, device = _opmath(like), like.device
    cols = []
    for v in values:
        if not isinstance(v, Tensor):
            cols.append(torch.full((b, c), float(v), dtype=dtype, device=device))
        elif v.numel() == c:
            cols.append(v.detach().reshape(1, c).to(device=device, dtype=dtype).expand(b, c))
        else:
            cols.append(v.detach().reshape(-1, c).to(device=device, dtype=dtype).expand(b, c))
    return torch.stack(cols, dim=-1).contiguous()


def _set_mean(sums: Tensor, spec: NormSpec, hw: int, weight: Tensor | None = None) -> Tensor:
    """(B, C) per-plane sums -> the mean over each plane's reduction set, per plane; with ``weight``
    the mean of weight[c] times the summed map."""
    if weight is not None:
        sums = sums * weight.detach().reshape(1, -1).to(sums.dtype)
    b, c = sums.shape
    if spec.kind == "batch":
        return (sums.sum(0, keepdim=True) / (b * hw)).expand(b, c)
    g = spec.groups
    m = sums.reshape(b, g, c // g).sum(2, keepdim=True) / ((c // g) * hw)
    return m.expand(b, g, c // g).reshape(b, c)


def _channel(sums: Tensor, like: Tensor) -> Tensor:
    """Per-plane sums (B, C) summed over the batch, shaped and typed like the parameter ``like``."""
    return sums.sum(0).to(like.dtype).reshape(like.shape)


def _planes(stat: Tensor, b: int, c: int) -> Tensor:
    """Statistics broadcastable to (B, C, 1, 1) as (B, C)."""
    return stat.reshape(-1, c).expand(b, c)


class _NormTangent:
    """A normalisation's tangent statistics: per-plane invstd, the set means of c_t and xhat c_t,
    and the relative tangent of invstd (for kind "none": 1, 0, 0 and None)."""

    def __init__(self, c_raw_t: Tensor, xhat: Tensor | None, invstd: Tensor | None, spec: NormSpec):
        b, c, hgt, wid = c_raw_t.shape
        self.none = spec.kind == "none"
        if self.none:
            self.invstd, self.mean_t, self.mean_xt, self.weight, self.rel_t = 1.0, 0.0, 0.0, 1.0, None
            return
        (sums,) = _pass("plane_dot", [c_raw_t, xhat])
        self.invstd = _planes(invstd, b, c).double()
        self.mean_t = _set_mean(sums[..., 0], spec, hgt * wid)
        self.mean_xt = _set_mean(sums[..., 1], spec, hgt * wid)
        self.weight = spec.weight
        self.rel_t = -self.invstd * self.mean_xt

    def rel_t_like(self, like: Tensor, spec: NormSpec) -> Tensor | None:
        """The relative tangent of invstd in the reference's shape and dtype."""
        if self.rel_t is None:
            return None
        return _bcast_stats(self.rel_t, spec).to(like.dtype)


def _norm_vjp_tangent(dr: Tensor, dc_t: Tensor, xhat: Tensor | None, xhat_t: Tensor, invstd: Tensor | None,
                      rel_t: Tensor | None, sums: Tensor, spec: NormSpec) -> Tensor:
    """:func:`reference._norm_vjp_tangent` from the per-plane sums (dc_t xhat + dc xhat_t, dc_t,
    dc xhat) of the pass that computed dc_t."""
    if spec.kind == "none":
        return dc_t
    b, c, hgt, wid = dc_t.shape
    hw = hgt * wid
    scalars = _per_plane([
        _planes(rel_t, b, c), _planes(invstd, b, c), spec.weight, _set_mean(sums[..., 1], spec, hw, spec.weight),
        _set_mean(sums[..., 2], spec, hw, spec.weight), _set_mean(sums[..., 0], spec, hw, spec.weight),
    ], dc_t)
    (dr_t,) = _pass("norm_vjp_tangent", [dr, dc_t, xhat_t, xhat], scalars)
    return dr_t


# --------------------------------------------------------------------------------------------
# The forward of the tracked step


def linearize_tracked(x: Tensor, h: Tensor, p: HGRUParams, conv: ConvFn = conv_same) -> tuple[Factors, Tracked]:
    """:func:`reference.linearize_tracked`: the gate of the inh conv's input (the native
    linearize kernel), then two plane passes around the exc conv (the inhibition with every
    factor and map it leaves, then the excitation and mix with theirs)."""
    x, h = x.detach().contiguous(), h.detach().contiguous()
    with torch.no_grad():
        hg, g1, hg1_slope = _C.linearize_gate_inh(h, _mat(p.u1_weight, h), _vec(p.u1_bias, h))
        c1_raw = conv(hg, p.w_inh).contiguous()
        mean1, inv1 = _stats(c1_raw, p.norm_inh)
        none1 = p.norm_inh.kind == "none"
        c1, xhat1, dc1_coef, s_q, s_r, dq_coef, dh_q_coef, h1 = _pass(
            "tracked_inhibit", [c1_raw, x, h],
            _per_plane([mean1, inv1, *_affine(p.norm_inh), p.alpha, p.mu], h), 0b11 if none1 else 0)
        if none1:
            c1 = c1_raw
        g2 = torch.sigmoid(F.conv2d(h1, p.u2_weight, p.u2_bias))
        c2_raw = conv(h1, p.w_exc).contiguous()
        mean2, inv2 = _stats(c2_raw, p.norm_exc)
        none2 = p.norm_exc.kind == "none"
        state, s_z, hh_minus_h, s_e, dc2_coef, dh1_coef, g2_slope, xhat2, c2 = _pass(
            "tracked_excite_mix", [c2_raw, h, h1, g2],
            _per_plane([mean2, inv2, *_affine(p.norm_exc), p.kappa, p.gamma, p.omega], h),
            (1 << 7) | (1 << 8) if none2 else 0)
        if none2:
            c2 = c2_raw
    factors = Factors(
        state=state, s_z=s_z, g2=g2, hh_minus_h=hh_minus_h, s_e=s_e, dc2_coef=dc2_coef, dh1_coef=dh1_coef,
        g2_slope=g2_slope, xhat2=xhat2, invstd2=_ref_stats(inv2, p.norm_exc, h), dq_coef=dq_coef, dc1_coef=dc1_coef,
        dh_q_coef=dh_q_coef, xhat1=xhat1, invstd1=_ref_stats(inv1, p.norm_inh, h), g1=g1, hg1_slope=hg1_slope,
    )
    return factors, Tracked(h=h, hg=hg, h1=h1, c1=c1, c2=c2, s_r=s_r, s_q=s_q)


def _stats(c_raw: Tensor, spec: NormSpec) -> tuple[Tensor | float, Tensor | float]:
    """Per-plane (B, C) mean and invstd (0 and 1 for kind "none")."""
    if spec.kind == "none":
        return 0.0, 1.0
    return _C.norm_stats(c_raw, spec.kind, spec.groups, spec.eps)


def _affine(spec: NormSpec) -> tuple:
    return (1.0, 0.0) if spec.kind == "none" else (spec.weight, spec.bias)


def _ref_stats(invstd: Tensor | float, spec: NormSpec, like: Tensor) -> Tensor | None:
    return None if spec.kind == "none" else _bcast_stats(invstd, spec).to(like.dtype)


# --------------------------------------------------------------------------------------------
# The column sums and the step's VJP


def column_sums(f: Factors, p: HGRUParams, conv_t: ConvFn = conv_same_transpose) -> tuple[Tensor, ColumnSumMaps]:
    """:func:`reference.column_sums`: two plane passes around the transposed exc conv, the native
    norm VJPs, and the native gate VJP (its U1^T mix in-kernel) for u."""
    de, dm2, dc2 = _pass("column_sums_excite_mix", [f.s_z, f.g2, f.s_e, f.hh_minus_h, f.g2_slope, f.dc2_coef])
    dr2 = norm_vjp(dc2, f.xhat2, f.invstd2, p.norm_exc)
    dh1, dq, dc1, dh = _pass("column_sums_inhibit", [de, f.dh1_coef, _mix_t(dm2, p.u2_weight), conv_t(dr2, p.w_exc),
                                                     f.dq_coef, f.dc1_coef, f.s_z, f.g2, f.dh_q_coef])
    dr1 = norm_vjp(dc1, f.xhat1, f.invstd1, p.norm_inh)
    dhg = conv_t(dr1, p.w_inh).contiguous()
    u = _C.vjp_gate_inh(dhg, dh, f.g1, f.hg1_slope, _mat(p.u1_weight, dhg), out=dh)
    return u, ColumnSumMaps(dz=f.s_z, de=de, dm2=dm2, dc2=dc2, dr2=dr2, dh1=dh1, dq=dq, dc1=dc1, dr1=dr1, dhg=dhg)


def step_vjp(v: Tensor, f: Factors, t: Tracked, p: HGRUParams, conv_t: ConvFn = conv_same_transpose,
             weight_grad=None) -> StepGrads:
    """:func:`reference.step_vjp`: a plane pass (every per-plane sum of the exc side), the native
    norm VJP, the transposed conv and the weight gradient, a plane pass for the inhibition (sums
    of alpha, mu and the inh norm), then the native gate VJP; 1x1 terms as matrix products."""
    weight_grad = weight_grad or conv_same_weight_grad
    k = p.w_inh.shape[-1]
    dm2, dc2, dh1, dh, sums2 = _pass("step_vjp_excite_mix", [v, f.s_z, f.g2, f.s_e, f.hh_minus_h, f.g2_slope,
                                                             f.dc2_coef, f.dh1_coef, t.h1, t.c2, f.xhat2])
    dr2 = norm_vjp(dc2, f.xhat2, f.invstd2, p.norm_exc)
    dh1 += _mix_t(dm2, p.u2_weight)
    extra = conv_t(dr2, p.w_exc)  # before the weight gradient: an FFT engine reuses dr2's transform
    dw_exc = weight_grad(t.h1, dr2, k)
    dx, dc1, dh, sums1 = _pass("step_vjp_inhibit", [dh1, extra, t.s_r, f.dq_coef, f.dc1_coef, t.c1, t.h, dh, f.xhat1],
                               _per_plane([p.alpha], v))
    dr1 = norm_vjp(dc1, f.xhat1, f.invstd1, p.norm_inh)
    dhg = conv_t(dr1, p.w_inh).contiguous()
    dw_inh = weight_grad(t.hg, dr1, k)
    dm1 = dhg * f.hg1_slope
    dh = _C.vjp_gate_inh(dhg, dh, f.g1, f.hg1_slope, _mat(p.u1_weight, dhg), out=dh)
    norms = []
    for spec, sums in ((p.norm_inh, sums1[..., 2:4]), (p.norm_exc, sums2[..., 3:5])):
        norms.append(None if spec.kind == "none" else (_channel(sums[..., 0], spec.weight),
                                                       _channel(sums[..., 1], spec.bias)))
    return StepGrads(
        x=dx, h=dh, u1_weight=_pixel_outer(dm1, t.h, p.u1_weight), u1_bias=dm1.sum(dim=(0, 2, 3)),
        u2_weight=_pixel_outer(dm2, t.h1, p.u2_weight), u2_bias=sums2[..., 5].sum(0).to(v.dtype), w_inh=dw_inh,
        w_exc=dw_exc, alpha=_channel(sums1[..., 0], p.alpha), mu=_channel(sums1[..., 1], p.mu),
        kappa=_channel(sums2[..., 0], p.kappa), gamma=_channel(sums2[..., 1], p.gamma),
        omega=_channel(sums2[..., 2], p.omega), norm_inh=norms[0], norm_exc=norms[1],
    )


# --------------------------------------------------------------------------------------------
# The five passes of the LCP tangent


def tangent_gate_inh(w: Tensor, f: Factors, t: Tracked, p: HGRUParams) -> tuple[Tensor, Tensor]:
    """:func:`reference.tangent_gate_inh`: (g1_t, hg_t)."""
    g1_t, hg_t = _pass("tangent_gate_inh", [w, f.g1, t.h, _mix(w, p.u1_weight)])
    return g1_t, hg_t


def tangent_inhibit(c1_raw_t: Tensor, w: Tensor, f: Factors, t: Tracked, p: HGRUParams) -> InhibitTangent:
    """:func:`reference.tangent_inhibit`: the inh norm's tangent statistics, one plane pass, then
    the U2 mix of h1_t for g2_t."""
    nt = _NormTangent(c1_raw_t, f.xhat1, f.invstd1, p.norm_inh)
    scalars = _per_plane([nt.invstd, nt.mean_t, nt.mean_xt, nt.weight, p.alpha], c1_raw_t)
    xhat1_t, c1_t, q_t, r_t, h1_t = _pass(
        "tangent_inhibit", [c1_raw_t, f.xhat1, f.dc1_coef, t.c1, w, t.s_q, t.s_r], scalars, 0b11 if nt.none else 0)
    if nt.none:
        xhat1_t = c1_t = c1_raw_t
    g2_t = _mix(h1_t, p.u2_weight).mul_(f.g2_slope)
    return InhibitTangent(xhat1_t, nt.rel_t_like(c1_raw_t, p.norm_inh), c1_t, q_t, r_t, h1_t, g2_t)


def tangent_excite_mix(c2_raw_t: Tensor, w: Tensor, it: InhibitTangent, f: Factors, t: Tracked, m: ColumnSumMaps,
                       p: HGRUParams, v: Tensor | None = None) -> ExciteTangent:
    """:func:`reference.tangent_excite_mix`: the exc norm's tangent statistics, one plane pass
    (every map and per-plane sum), the norm VJP's tangent pass, and in torch the U2 terms."""
    spec = p.norm_exc
    nt = _NormTangent(c2_raw_t, f.xhat2, f.invstd2, spec)
    scalars = _per_plane([nt.invstd, nt.mean_t, nt.mean_xt, nt.weight, p.kappa, p.gamma, p.omega], c2_raw_t)
    xhat2_t, dc2_t, dh1_t, dh_t, dm2_t, sums = _pass(
        "tangent_excite_mix",
        [c2_raw_t, f.xhat2, w, it.h1_t, it.g2_t, t.c2, t.h1, f.s_e, f.g2, f.hh_minus_h, f.s_z, v, m.dz, m.de,
         f.dc2_coef, f.dh1_coef, f.g2_slope, m.dc2],
        scalars, 1 if nt.none else 0)
    if nt.none:
        xhat2_t = c2_raw_t
    dh1_t += _mix_t(dm2_t, p.u2_weight)
    du2 = _pixel_outer(dm2_t, t.h1, p.u2_weight) + _pixel_outer(m.dm2, it.h1_t, p.u2_weight)
    dnorm = None if nt.none else (_channel(sums[..., 3], spec.weight), _channel(sums[..., 4], spec.bias))
    dr2_t = _norm_vjp_tangent(m.dr2, dc2_t, f.xhat2, xhat2_t, f.invstd2, nt.rel_t, sums[..., 3:], spec)
    return ExciteTangent(dh1_t, dh_t, dr2_t, dm2_t, _channel(sums[..., 0], p.kappa), _channel(sums[..., 1], p.gamma),
                         _channel(sums[..., 2], p.omega), du2, dnorm)


def tangent_vjp_inhibit(dh1_t: Tensor, dh_t: Tensor, w: Tensor, it: InhibitTangent, f: Factors, t: Tracked,
                        m: ColumnSumMaps, p: HGRUParams, dh1_t_extra: Tensor | None = None) -> VjpInhibitTangent:
    """:func:`reference.tangent_vjp_inhibit`: one plane pass (``dh1_t_extra`` added in it), then
    the inh norm VJP's tangent pass."""
    spec = p.norm_inh
    dx, dh_t, dc1_t, sums = _pass(
        "tangent_vjp_inhibit",
        [dh1_t, dh1_t_extra, t.s_r, it.r_t, t.s_q, it.q_t, m.dh1, f.dq_coef, f.dc1_coef, m.dq, w, t.c1, it.c1_t, t.h,
         dh_t, f.xhat1, m.dc1, it.xhat1_t],
        _per_plane([p.alpha], dh1_t))
    none = spec.kind == "none"
    dnorm = None if none else (_channel(sums[..., 2], spec.weight), _channel(sums[..., 3], spec.bias))
    dr1_t = _norm_vjp_tangent(m.dr1, dc1_t, f.xhat1, it.xhat1_t, f.invstd1, it.invstd1_rel_t, sums[..., 2:], spec)
    return VjpInhibitTangent(dx, dh_t, dr1_t, _channel(sums[..., 0], p.alpha), _channel(sums[..., 1], p.mu), dnorm)


def tangent_vjp_gate_inh(dhg_t: Tensor, dh_t: Tensor, w: Tensor, g1_t: Tensor, f: Factors, t: Tracked,
                         m: ColumnSumMaps, p: HGRUParams) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`reference.tangent_vjp_gate_inh`: one plane pass, then the U1 terms in torch."""
    dm1_t, dm1, dh_t = _pass("tangent_vjp_gate_inh", [dhg_t, m.dhg, f.hg1_slope, w, f.g1, t.h, g1_t, dh_t])
    dh_t += _mix_t(dm1_t, p.u1_weight)
    du1 = _pixel_outer(dm1_t, t.h, p.u1_weight) + _pixel_outer(dm1, w, p.u1_weight)
    return dh_t, du1, dm1_t.sum(dim=(0, 2, 3))


def linearization(f: Factors, p: HGRUParams, conv) -> "NativeLinearization":
    """The native linearisation (its VJP J^T v) at the tracked step's point, from the tracked
    step's factors: one plane pass of products (``native_factors``) instead of a second step
    with its two convs. ``conv`` is the conv engine (its transposed conv runs in every VJP)."""
    b, c = f.state.shape[:2]

    def planes(invstd: Tensor | None) -> Tensor | None:
        return None if invstd is None else _planes(invstd, b, c).to(_opmath(f.state)).contiguous()

    with torch.no_grad():
        dh1_to_dc1, dh1_to_dh, v_to_dc2, v_to_dh1, v_to_dm2, v_to_dh = _pass(
            "native_factors", [f.dq_coef, f.dc1_coef, f.dh_q_coef, f.s_z, f.g2, f.s_e, f.dc2_coef, f.dh1_coef,
                               f.hh_minus_h, f.g2_slope])
        factors = NativeFactors(
            state=f.state, g1=f.g1, dhg_to_dm1=f.hg1_slope, xhat1=f.xhat1, invstd1=planes(f.invstd1),
            dh1_to_dc1=dh1_to_dc1, dh1_to_dh=dh1_to_dh, xhat2=f.xhat2, invstd2=planes(f.invstd2), v_to_dc2=v_to_dc2,
            v_to_dh1=v_to_dh1, v_to_dm2=v_to_dm2, v_to_dh=v_to_dh,
        )
    return NativeLinearization.from_factors(p, factors, conv)


def lcp_tangent(w: Tensor, f: Factors, t: Tracked, m: ColumnSumMaps, p: HGRUParams, conv: ConvFn = conv_same,
                conv_t=reference.conv_same_transpose, weight_grad=None, v: Tensor | None = None):
    """:func:`reference.lcp_tangent` with the passes of this module."""
    return reference.lcp_tangent(w, f, t, m, p, conv, conv_t, weight_grad, v, passes=sys.modules[__name__])


#: Opt-in for the CUDA plane passes: not yet run on a GPU, they stay off until their gpu tests
#: have passed there (``CRBP_FAST_CUDA_TRACKED=1`` turns them on).
CUDA_SWITCH = "CRBP_FAST_CUDA_TRACKED"


def supported(x: Tensor) -> bool:
    """Whether these passes run for maps like ``x``: CPU float32 / float64; CUDA float32 with a
    CUDA build of the extension, when ``CRBP_FAST_CUDA_TRACKED=1`` and outside
    ``torch.use_deterministic_algorithms`` (the CUDA sums are float64 atomics, whose order varies)."""
    if x.device.type == "cuda":
        if not _C.with_cuda() or os.environ.get(CUDA_SWITCH) != "1":
            return False
        if torch.are_deterministic_algorithms_enabled():
            return False
    return x.dtype in DTYPES.get(x.device.type, ())


__all__ = [
    "column_sums", "lcp_tangent", "lcp_weights", "linearization", "linearize_tracked", "step_vjp", "supported", "tangent_excite_mix",
    "tangent_gate_inh", "tangent_inhibit", "tangent_vjp_gate_inh", "tangent_vjp_inhibit",
]
