"""The tracked step's passes as fused plane passes, written once for every fused backend.

:class:`PlanePasses` has the names, arguments and results of :mod:`crbp_fast.hgru.reference`
(where the math is written out): ``linearize_tracked``, ``column_sums``, ``step_vjp``, the five
passes of :func:`~crbp_fast.hgru.reference.lcp_tangent` and ``linearization`` (the adjoint's
linearisation from the tracked step's factors). Each elementwise stretch of a pass is one
*plane pass*: one kernel over (b, c) planes that reads its maps once and writes every map and
per-plane sum (of parameter gradients and normalisation statistics, in float64) the stretch
leaves. The passes are named and numbered in ``csrc/cpu/plane_passes.h``; a backend supplies
them and four step-sized kernels through :class:`PlaneKernels`:

- :mod:`crbp_fast.hgru.native.tracked`: the extension's plane passes (CPU; CUDA float32 on opt-in);
- :mod:`crbp_fast.hgru.triton.tracked`: Triton kernels of the same bodies (CUDA; CPU under
  triton's interpreter).

The rest stays in torch, as in the reference: the 1x1 mixes and pixel outer products (GEMMs),
the convs (the conv engine), the reduction of the per-plane sums over each normalisation set
((B, C) arrays), and the gate g2 = sigma(U2 h1 + b2) of the forward. Where a normalisation's
tangent needs set means first, a reduction over two maps runs before its pass (``plane_dot``)
and its VJP's tangent after it (``norm_vjp_tangent``), so ``tangent_excite_mix`` is three kernels.

Memory traffic of the tangent's elementwise work, in (B, C, H, W) maps read or written (norm
"batch", the 1x1 mixes and pixel outer products included): about 113, against roughly 500 for the
reference's ~200 eager ops (each reads one or two maps and writes one). Results equal the
reference's up to rounding (the per-plane sums are taken in float64).
"""

from __future__ import annotations

import os
import sys
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .reference import (
    ColumnSumMaps,
    ConvFn,
    ExciteTangent,
    Factors,
    HGRUParams,
    InhibitTangent,
    NormSpec,
    StepGrads,
    Tracked,
    VjpInhibitTangent,
    _mix,
    _mix_t,
    _pixel_outer,
    conv_same,
    conv_same_transpose,
    conv_same_weight_grad,
)

#: Opt-in for the fused tracked passes on CUDA (native and Triton): not yet run on a GPU, they
#: stay off there until their gpu tests have passed (``CRBP_FAST_CUDA_TRACKED=1`` turns them on);
#: CUDA then runs the reference's passes (torch ops).
CUDA_SWITCH = "CRBP_FAST_CUDA_TRACKED"


def cuda_opted_in() -> bool:
    """Whether ``CRBP_FAST_CUDA_TRACKED=1`` is set (:data:`CUDA_SWITCH`)."""
    return os.environ.get(CUDA_SWITCH) == "1"


def opmath(like: Tensor) -> torch.dtype:
    """The dtype a pass computes in for maps like ``like``."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def bcast_stats(t: Tensor, spec: NormSpec) -> Tensor:
    """(B, C) statistics in the reference's shape: (1, C, 1, 1) for "batch", (B, C, 1, 1) for "group"."""
    if spec.kind == "batch":
        t = t[:1]
    return t.reshape(t.shape[0], t.shape[1], 1, 1)


class PlaneKernels(Protocol):
    """What a backend supplies to :class:`PlanePasses`."""

    def plane_pass(self, name: str, maps: list[Tensor | None], scalars: Tensor | None = None,
                   skip: int = 0) -> list[Tensor | None]:
        """The plane pass ``name`` (``csrc/cpu/plane_passes.h``: its inputs in order, None where
        the table allows it; ``scalars`` (B, C, S) in the compute dtype; ``skip`` a mask of
        outputs not to write, returned as None): its outputs, then its (B, C, n_sums) float64
        per-plane sums when it has any."""

    def gate_inh(self, h: Tensor, p: HGRUParams) -> tuple[Tensor, Tensor, Tensor]:
        """(hg = h g1, g1 = sigma(U1 h + b1), hg1_slope = h g1 (1 - g1))."""

    def norm_stats(self, c_raw: Tensor, spec: NormSpec) -> tuple[Tensor, Tensor]:
        """Per-plane (B, C) mean and invstd of each plane's reduction set (norm kind not "none")."""

    def norm_vjp(self, dc: Tensor, xhat: Tensor, invstd: Tensor, spec: NormSpec,
                 sums: tuple[Tensor, Tensor] | None) -> Tensor:
        """N^T(dc) (norm kind not "none"); ``invstd`` in the reference's shape; ``sums`` the
        per-plane (B, C) sums of dc and dc xhat where the pass that wrote dc took them."""

    def vjp_gate_inh(self, dhg: Tensor, dh: Tensor, g1: Tensor, hg1_slope: Tensor, p: HGRUParams) -> Tensor:
        """dh + dhg g1 + U1^T (dhg hg1_slope) (``dh`` may be overwritten)."""

    def linearization(self, p: HGRUParams, f: Factors, products: tuple[Tensor, ...], invstd: tuple,
                      engine) -> object:
        """The backend's linearisation (``.state``, ``.vjp``) from the tracked factors ``f``, the
        ``native_factors`` pass's six products and the per-plane (B, C) invstds (or None)."""


def _per_plane(values: list, like: Tensor) -> Tensor:
    """(B, C, S) scalars in the compute dtype: each value a per-channel parameter ((C,) or
    (C, 1, 1)), per-plane statistics ((B, C), (1, C, 1, 1) or (B, C, 1, 1)) or a number."""
    b, c = like.shape[:2]
    dtype, device = opmath(like), like.device
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


def _affine(spec: NormSpec) -> tuple:
    return (1.0, 0.0) if spec.kind == "none" else (spec.weight, spec.bias)


def _ref_stats(invstd: Tensor | float, spec: NormSpec, like: Tensor) -> Tensor | None:
    return None if spec.kind == "none" else bcast_stats(invstd, spec).to(like.dtype)


class _NormTangent:
    """A normalisation's tangent statistics: per-plane invstd, the set means of c_t and xhat c_t,
    and the relative tangent of invstd (for kind "none": 1, 0, 0 and None)."""

    def __init__(self, passes: PlanePasses, c_raw_t: Tensor, xhat: Tensor | None, invstd: Tensor | None,
                 spec: NormSpec):
        b, c, hgt, wid = c_raw_t.shape
        self.none = spec.kind == "none"
        if self.none:
            self.invstd, self.mean_t, self.mean_xt, self.weight, self.rel_t = 1.0, 0.0, 0.0, 1.0, None
            return
        (sums,) = passes._pass("plane_dot", [c_raw_t, xhat])
        self.invstd = _planes(invstd, b, c).double()
        self.mean_t = _set_mean(sums[..., 0], spec, hgt * wid)
        self.mean_xt = _set_mean(sums[..., 1], spec, hgt * wid)
        self.weight = spec.weight
        self.rel_t = -self.invstd * self.mean_xt

    def rel_t_like(self, like: Tensor, spec: NormSpec) -> Tensor | None:
        """The relative tangent of invstd in the reference's shape and dtype."""
        if self.rel_t is None:
            return None
        return bcast_stats(self.rel_t, spec).to(like.dtype)


class PlanePasses:
    """The passes of :mod:`crbp_fast.hgru.reference`'s tracked step on a backend's plane
    kernels ``k`` (module docstring). A backend module exposes an instance's methods as its
    functions (so that ``reference.lcp_tangent(..., passes=module)`` and the tracked node find
    them there)."""

    def __init__(self, k: PlaneKernels):
        self.k = k

    def _pass(self, name: str, maps: list[Tensor | None], scalars: Tensor | None = None, skip: int = 0) -> list:
        return self.k.plane_pass(name, [None if m is None else m.detach().contiguous() for m in maps], scalars, skip)

    def _norm_vjp(self, dc: Tensor, xhat: Tensor | None, invstd: Tensor | None, spec: NormSpec,
                  sums: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return dc if spec.kind == "none" else self.k.norm_vjp(dc, xhat, invstd, spec, sums)

    def _norm_vjp_tangent(self, dr: Tensor, dc_t: Tensor, xhat: Tensor | None, xhat_t: Tensor,
                          invstd: Tensor | None, rel_t: Tensor | None, sums: Tensor, spec: NormSpec) -> Tensor:
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
        (dr_t,) = self._pass("norm_vjp_tangent", [dr, dc_t, xhat_t, xhat], scalars)
        return dr_t

    def _stats(self, c_raw: Tensor, spec: NormSpec) -> tuple[Tensor | float, Tensor | float]:
        """Per-plane (B, C) mean and invstd (0 and 1 for kind "none")."""
        if spec.kind == "none":
            return 0.0, 1.0
        return self.k.norm_stats(c_raw, spec)

    # ----------------------------------------------------------------------------------------
    # The forward of the tracked step

    def linearize_tracked(self, x: Tensor, h: Tensor, p: HGRUParams,
                          conv: ConvFn = conv_same) -> tuple[Factors, Tracked]:
        """:func:`reference.linearize_tracked`: the gate of the inh conv's input, then two plane
        passes around the exc conv (the inhibition with every factor and map it leaves, then the
        excitation and mix with theirs)."""
        x, h = x.detach().contiguous(), h.detach().contiguous()
        with torch.no_grad():
            hg, g1, hg1_slope = self.k.gate_inh(h, p)
            c1_raw = conv(hg, p.w_inh).contiguous()
            mean1, inv1 = self._stats(c1_raw, p.norm_inh)
            none1 = p.norm_inh.kind == "none"
            c1, xhat1, dc1_coef, s_q, s_r, dq_coef, dh_q_coef, h1 = self._pass(
                "tracked_inhibit", [c1_raw, x, h],
                _per_plane([mean1, inv1, *_affine(p.norm_inh), p.alpha, p.mu], h), 0b11 if none1 else 0)
            if none1:
                c1 = c1_raw
            g2 = torch.sigmoid(F.conv2d(h1, p.u2_weight, p.u2_bias))
            c2_raw = conv(h1, p.w_exc).contiguous()
            mean2, inv2 = self._stats(c2_raw, p.norm_exc)
            none2 = p.norm_exc.kind == "none"
            state, s_z, hh_minus_h, s_e, dc2_coef, dh1_coef, g2_slope, xhat2, c2 = self._pass(
                "tracked_excite_mix", [c2_raw, h, h1, g2],
                _per_plane([mean2, inv2, *_affine(p.norm_exc), p.kappa, p.gamma, p.omega], h),
                (1 << 7) | (1 << 8) if none2 else 0)
            if none2:
                c2 = c2_raw
        factors = Factors(
            state=state, s_z=s_z, g2=g2, hh_minus_h=hh_minus_h, s_e=s_e, dc2_coef=dc2_coef, dh1_coef=dh1_coef,
            g2_slope=g2_slope, xhat2=xhat2, invstd2=_ref_stats(inv2, p.norm_exc, h), dq_coef=dq_coef,
            dc1_coef=dc1_coef, dh_q_coef=dh_q_coef, xhat1=xhat1, invstd1=_ref_stats(inv1, p.norm_inh, h), g1=g1,
            hg1_slope=hg1_slope,
        )
        return factors, Tracked(h=h, hg=hg, h1=h1, c1=c1, c2=c2, s_r=s_r, s_q=s_q)

    # ----------------------------------------------------------------------------------------
    # The column sums and the step's VJP

    def column_sums(self, f: Factors, p: HGRUParams,
                    conv_t: ConvFn = conv_same_transpose) -> tuple[Tensor, ColumnSumMaps]:
        """:func:`reference.column_sums`: two plane passes around the transposed exc conv, the
        norm VJPs, and the gate VJP (its U1^T mix) for u."""
        de, dm2, dc2 = self._pass("column_sums_excite_mix", [f.s_z, f.g2, f.s_e, f.hh_minus_h, f.g2_slope, f.dc2_coef])
        dr2 = self._norm_vjp(dc2, f.xhat2, f.invstd2, p.norm_exc)
        dh1, dq, dc1, dh = self._pass("column_sums_inhibit", [
            de, f.dh1_coef, _mix_t(dm2, p.u2_weight), conv_t(dr2, p.w_exc), f.dq_coef, f.dc1_coef, f.s_z, f.g2,
            f.dh_q_coef])
        dr1 = self._norm_vjp(dc1, f.xhat1, f.invstd1, p.norm_inh)
        dhg = conv_t(dr1, p.w_inh).contiguous()
        u = self.k.vjp_gate_inh(dhg, dh, f.g1, f.hg1_slope, p)
        return u, ColumnSumMaps(dz=f.s_z, de=de, dm2=dm2, dc2=dc2, dr2=dr2, dh1=dh1, dq=dq, dc1=dc1, dr1=dr1, dhg=dhg)

    def step_vjp(self, v: Tensor, f: Factors, t: Tracked, p: HGRUParams, conv_t: ConvFn = conv_same_transpose,
                 weight_grad=None) -> StepGrads:
        """:func:`reference.step_vjp`: a plane pass (every per-plane sum of the exc side), the norm
        VJP, the transposed conv and the weight gradient, a plane pass for the inhibition (sums
        of alpha, mu and the inh norm), then the gate VJP; 1x1 terms as matrix products."""
        weight_grad = weight_grad or conv_same_weight_grad
        k = p.w_inh.shape[-1]
        dm2, dc2, dh1, dh, sums2 = self._pass("step_vjp_excite_mix", [
            v, f.s_z, f.g2, f.s_e, f.hh_minus_h, f.g2_slope, f.dc2_coef, f.dh1_coef, t.h1, t.c2, f.xhat2])
        dr2 = self._norm_vjp(dc2, f.xhat2, f.invstd2, p.norm_exc, (sums2[..., 4], sums2[..., 3]))
        dh1 += _mix_t(dm2, p.u2_weight)
        extra = conv_t(dr2, p.w_exc)  # before the weight gradient: an FFT engine reuses dr2's transform
        dw_exc = weight_grad(t.h1, dr2, k)
        dx, dc1, dh, sums1 = self._pass("step_vjp_inhibit", [
            dh1, extra, t.s_r, f.dq_coef, f.dc1_coef, t.c1, t.h, dh, f.xhat1], _per_plane([p.alpha], v))
        dr1 = self._norm_vjp(dc1, f.xhat1, f.invstd1, p.norm_inh, (sums1[..., 3], sums1[..., 2]))
        dhg = conv_t(dr1, p.w_inh).contiguous()
        dw_inh = weight_grad(t.hg, dr1, k)
        dm1 = dhg * f.hg1_slope
        dh = self.k.vjp_gate_inh(dhg, dh, f.g1, f.hg1_slope, p)
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

    # ----------------------------------------------------------------------------------------
    # The five passes of the LCP tangent

    def tangent_gate_inh(self, w: Tensor, f: Factors, t: Tracked, p: HGRUParams) -> tuple[Tensor, Tensor]:
        """:func:`reference.tangent_gate_inh`: (g1_t, hg_t)."""
        g1_t, hg_t = self._pass("tangent_gate_inh", [w, f.g1, t.h, _mix(w, p.u1_weight)])
        return g1_t, hg_t

    def tangent_inhibit(self, c1_raw_t: Tensor, w: Tensor, f: Factors, t: Tracked, p: HGRUParams) -> InhibitTangent:
        """:func:`reference.tangent_inhibit`: the inh norm's tangent statistics, one plane pass,
        then the U2 mix of h1_t for g2_t."""
        nt = _NormTangent(self, c1_raw_t, f.xhat1, f.invstd1, p.norm_inh)
        scalars = _per_plane([nt.invstd, nt.mean_t, nt.mean_xt, nt.weight, p.alpha], c1_raw_t)
        xhat1_t, c1_t, q_t, r_t, h1_t = self._pass(
            "tangent_inhibit", [c1_raw_t, f.xhat1, f.dc1_coef, t.c1, w, t.s_q, t.s_r], scalars,
            0b11 if nt.none else 0)
        if nt.none:
            xhat1_t = c1_t = c1_raw_t
        g2_t = _mix(h1_t, p.u2_weight).mul_(f.g2_slope)
        return InhibitTangent(xhat1_t, nt.rel_t_like(c1_raw_t, p.norm_inh), c1_t, q_t, r_t, h1_t, g2_t)

    def tangent_excite_mix(self, c2_raw_t: Tensor, w: Tensor, it: InhibitTangent, f: Factors, t: Tracked,
                           m: ColumnSumMaps, p: HGRUParams, v: Tensor | None = None) -> ExciteTangent:
        """:func:`reference.tangent_excite_mix`: the exc norm's tangent statistics, one plane pass
        (every map and per-plane sum), the norm VJP's tangent pass, and in torch the U2 terms."""
        spec = p.norm_exc
        nt = _NormTangent(self, c2_raw_t, f.xhat2, f.invstd2, spec)
        scalars = _per_plane([nt.invstd, nt.mean_t, nt.mean_xt, nt.weight, p.kappa, p.gamma, p.omega], c2_raw_t)
        xhat2_t, dc2_t, dh1_t, dh_t, dm2_t, sums = self._pass(
            "tangent_excite_mix",
            [c2_raw_t, f.xhat2, w, it.h1_t, it.g2_t, t.c2, t.h1, f.s_e, f.g2, f.hh_minus_h, f.s_z, v, m.dz, m.de,
             f.dc2_coef, f.dh1_coef, f.g2_slope, m.dc2],
            scalars, 1 if nt.none else 0)
        if nt.none:
            xhat2_t = c2_raw_t
        dh1_t += _mix_t(dm2_t, p.u2_weight)
        du2 = _pixel_outer(dm2_t, t.h1, p.u2_weight) + _pixel_outer(m.dm2, it.h1_t, p.u2_weight)
        dnorm = None if nt.none else (_channel(sums[..., 3], spec.weight), _channel(sums[..., 4], spec.bias))
        dr2_t = self._norm_vjp_tangent(m.dr2, dc2_t, f.xhat2, xhat2_t, f.invstd2, nt.rel_t, sums[..., 3:], spec)
        return ExciteTangent(dh1_t, dh_t, dr2_t, dm2_t, _channel(sums[..., 0], p.kappa),
                             _channel(sums[..., 1], p.gamma), _channel(sums[..., 2], p.omega), du2, dnorm)

    def tangent_vjp_inhibit(self, dh1_t: Tensor, dh_t: Tensor, w: Tensor, it: InhibitTangent, f: Factors,
                            t: Tracked, m: ColumnSumMaps, p: HGRUParams,
                            dh1_t_extra: Tensor | None = None) -> VjpInhibitTangent:
        """:func:`reference.tangent_vjp_inhibit`: one plane pass (``dh1_t_extra`` added in it),
        then the inh norm VJP's tangent pass."""
        spec = p.norm_inh
        dx, dh_t, dc1_t, sums = self._pass(
            "tangent_vjp_inhibit",
            [dh1_t, dh1_t_extra, t.s_r, it.r_t, t.s_q, it.q_t, m.dh1, f.dq_coef, f.dc1_coef, m.dq, w, t.c1, it.c1_t,
             t.h, dh_t, f.xhat1, m.dc1, it.xhat1_t],
            _per_plane([p.alpha], dh1_t))
        none = spec.kind == "none"
        dnorm = None if none else (_channel(sums[..., 2], spec.weight), _channel(sums[..., 3], spec.bias))
        dr1_t = self._norm_vjp_tangent(m.dr1, dc1_t, f.xhat1, it.xhat1_t, f.invstd1, it.invstd1_rel_t,
                                       sums[..., 2:], spec)
        return VjpInhibitTangent(dx, dh_t, dr1_t, _channel(sums[..., 0], p.alpha), _channel(sums[..., 1], p.mu),
                                 dnorm)

    def tangent_vjp_gate_inh(self, dhg_t: Tensor, dh_t: Tensor, w: Tensor, g1_t: Tensor, f: Factors, t: Tracked,
                             m: ColumnSumMaps, p: HGRUParams) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`reference.tangent_vjp_gate_inh`: one plane pass, then the U1 terms in torch."""
        dm1_t, dm1, dh_t = self._pass("tangent_vjp_gate_inh", [dhg_t, m.dhg, f.hg1_slope, w, f.g1, t.h, g1_t, dh_t])
        dh_t += _mix_t(dm1_t, p.u1_weight)
        du1 = _pixel_outer(dm1_t, t.h, p.u1_weight) + _pixel_outer(dm1, w, p.u1_weight)
        return dh_t, du1, dm1_t.sum(dim=(0, 2, 3))

    def linearization(self, f: Factors, p: HGRUParams, conv):
        """The backend's linearisation (its VJP J^T v) at the tracked step's point, from the
        tracked step's factors: one plane pass of products (``native_factors``) instead of a
        second step with its two convs. ``conv`` is the conv engine (its transposed conv runs in
        every VJP)."""
        b, c = f.state.shape[:2]

        def planes(invstd: Tensor | None) -> Tensor | None:
            return None if invstd is None else _planes(invstd, b, c).to(opmath(f.state)).contiguous()

        with torch.no_grad():
            products = self._pass("native_factors", [
                f.dq_coef, f.dc1_coef, f.dh_q_coef, f.s_z, f.g2, f.s_e, f.dc2_coef, f.dh1_coef, f.hh_minus_h,
                f.g2_slope])
            return self.k.linearization(p, f, tuple(products), (planes(f.invstd1), planes(f.invstd2)), conv)

    def lcp_tangent(self, w: Tensor, f: Factors, t: Tracked, m: ColumnSumMaps, p: HGRUParams,
                    conv: ConvFn = conv_same, conv_t=conv_same_transpose, weight_grad=None,
                    v: Tensor | None = None, passes=None):
        """:func:`reference.lcp_tangent` with these passes (or ``passes``: the backend module that
        exposes them, so that a patched module function is the one that runs)."""
        return reference.lcp_tangent(w, f, t, m, p, conv, conv_t, weight_grad, v, passes=passes or self)


    def module_functions(self, module: str) -> tuple:
        """The passes as functions of the backend module named ``module``, in
        :data:`PASS_NAMES` order: the bound methods, and ``lcp_tangent`` running the five tangent
        passes that the module holds at call time (so that a patched module function is the one
        that runs, as the tracked node looks the others up there too)."""

        def lcp_tangent(w: Tensor, f: Factors, t: Tracked, m: ColumnSumMaps, p: HGRUParams, conv: ConvFn = conv_same,
                        conv_t=conv_same_transpose, weight_grad=None, v: Tensor | None = None):
            """:func:`reference.lcp_tangent` with the passes of this module."""
            return self.lcp_tangent(w, f, t, m, p, conv, conv_t, weight_grad, v, passes=sys.modules[module])

        return (*(getattr(self, name) for name in PASS_NAMES[:-1]), lcp_tangent)


#: The names a backend module exposes from its :class:`PlanePasses` instance
#: (:meth:`PlanePasses.module_functions`).
PASS_NAMES = (
    "column_sums", "linearization", "linearize_tracked", "step_vjp", "tangent_excite_mix", "tangent_gate_inh",
    "tangent_inhibit", "tangent_vjp_gate_inh", "tangent_vjp_inhibit", "lcp_tangent",
)

__all__ = ["CUDA_SWITCH", "PASS_NAMES", "PlaneKernels", "PlanePasses", "bcast_stats", "cuda_opted_in", "opmath"]
