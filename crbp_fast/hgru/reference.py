"""Reference passes of the hGRU step and of its vector-Jacobian product, in plain PyTorch.

This file is the specification every fused backend implements: the same functions, the same
arguments, the same results. Notation: ``sigma`` = sigmoid, ``sp`` = softplus, ``(*)`` = 'same'
zero-padded cross-correlation (``F.conv2d(..., padding=k // 2)``), products elementwise,
per-channel parameters broadcast over (B, H, W).

Forward step F(x, h), shapes (B, C, H, W)::

    g1  = sigma(U1 h + b1)                      # gate_inh        (1x1 conv, per pixel)
    hg  = h * g1                                #   "
    c1  = N_inh(W_inh (*) hg)                   # conv, then inhibit
    q   = c1 * (alpha * h + mu)                 # inhibit
    h1  = sp(x - sp(q))                         #   "
    g2  = sigma(U2 h1 + b2)                     #   "
    c2  = N_exc(W_exc (*) h1)                   # conv, then excite_mix
    e   = kappa * h1 + gamma * c2 + omega * h1 * c2
    hh  = sp(e)                                 # excite_mix
    z   = (1 - g2) * h + g2 * hh                #   "
    F   = sp(z)                                 #   "

``N`` is a normalisation whose statistics are taken over a reduction set S: per channel over
(B, H, W) for ``"batch"`` (BatchNorm with batch statistics, as published), per (sample, group)
over (C / G, H, W) for ``"group"``, and the identity for ``"none"``. With
``xhat = (c - mean_S) * invstd_S``, ``N(c) = weight * xhat + bias``.

VJP at a fixed (x, h): u = J^T v with J = dF/dh, in three passes around two transposed convs::

    dz   = v * sigma(z)
    dhh  = dz * g2 ;  dg2 = dz * (hh - h) ;  dh = dz * (1 - g2)
    de   = dhh * sigma(e)
    dc2  = de * (gamma + omega * h1)                       # vjp_excite_mix
    dh1  = de * (kappa + omega * c2) + U2^T (dg2 * g2 * (1 - g2))
    dr2  = N_exc^T(dc2)                                    # norm_vjp
    dh1 += W_exc^T (*) dr2                                 # transposed conv
    dq   = -dh1 * sigma(x - sp(q)) * sigma(q)              # vjp_inhibit
    dc1  = dq * (alpha * h + mu) ;  dh += dq * c1 * alpha
    dr1  = N_inh^T(dc1)                                    # norm_vjp
    dhg  = W_inh^T (*) dr1                                 # transposed conv
    dh  += dhg * g1 + U1^T (dhg * h * g1 * (1 - g1))       # vjp_gate_inh

with ``N^T(dy) = invstd * (dxh - mean_S(dxh) - xhat * mean_S(dxh * xhat))``, ``dxh = weight * dy``
(the batch statistics make every sample's J depend on the whole batch, and this term carries it).

Everything in the VJP except ``v`` is fixed at h, so :func:`linearize` computes the factors once
and each :func:`vjp` is three elementwise passes, two norm reductions and two transposed convs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_KINDS = ("batch", "group", "none")

ConvFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class NormSpec:
    """A normalisation of the conv outputs: kind, affine parameters, eps and group count."""

    kind: str
    weight: Tensor | None = None
    bias: Tensor | None = None
    eps: float = 1e-3
    groups: int = 1


class HGRUParams(NamedTuple):
    """Every parameter of one hGRU step, as plain tensors (shapes for C channels, k x k)."""

    u1_weight: Tensor  # (C, C, 1, 1)
    u1_bias: Tensor  # (C,)
    u2_weight: Tensor  # (C, C, 1, 1)
    u2_bias: Tensor  # (C,)
    w_inh: Tensor  # (C, C, k, k)
    w_exc: Tensor  # (C, C, k, k)
    alpha: Tensor  # (C, 1, 1)
    mu: Tensor  # (C, 1, 1)
    kappa: Tensor  # (C, 1, 1)
    gamma: Tensor  # (C, 1, 1)
    omega: Tensor  # (C, 1, 1)
    norm_inh: NormSpec
    norm_exc: NormSpec


def conv_same(x: Tensor, w: Tensor) -> Tensor:
    """'same' zero-padded cross-correlation, (B, Cin, H, W) x (Cout, Cin, k, k) -> (B, Cout, H, W)."""
    return F.conv2d(x, w, padding=w.shape[-1] // 2)


def conv_same_transpose(y: Tensor, w: Tensor) -> Tensor:
    """Adjoint of :func:`conv_same` in its input: correlation with the flipped, channel-transposed kernel."""
    return F.conv2d(y, w.flip(-1, -2).transpose(0, 1), padding=w.shape[-1] // 2)


def _mix(x: Tensor, w: Tensor) -> Tensor:
    """1x1 channel mix without bias: sum_c w[o, c] x[b, c]."""
    return torch.einsum("oc,bchw->bohw", w.reshape(w.shape[0], w.shape[1]), x)


def _mix_t(x: Tensor, w: Tensor) -> Tensor:
    """Transpose of :func:`_mix`."""
    return torch.einsum("oc,bohw->bchw", w.reshape(w.shape[0], w.shape[1]), x)


def _bc(p: Tensor) -> Tensor:
    """A per-channel vector (C,) or (C, 1, 1) as (1, C, 1, 1)."""
    return p.reshape(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------
# Normalisation


def _group_view(c: Tensor, groups: int) -> Tensor:
    b, ch, hgt, wid = c.shape
    return c.reshape(b, groups, (ch // groups) * hgt * wid)


def norm_stats(c: Tensor, spec: NormSpec) -> tuple[Tensor, Tensor]:
    """Mean and inverse standard deviation over the reduction set, broadcastable to c.

    Biased variance, as BatchNorm and GroupNorm use for normalising.
    """
    if spec.kind == "batch":
        var, mean = torch.var_mean(c, dim=(0, 2, 3), keepdim=True, correction=0)
        return mean, torch.rsqrt(var + spec.eps)
    if spec.kind == "group":
        b, ch = c.shape[:2]
        var, mean = torch.var_mean(_group_view(c, spec.groups), dim=2, keepdim=True, correction=0)
        rep = ch // spec.groups
        mean = mean.repeat_interleave(rep, dim=1).reshape(b, ch, 1, 1)
        invstd = torch.rsqrt(var + spec.eps).repeat_interleave(rep, dim=1).reshape(b, ch, 1, 1)
        return mean, invstd
    raise ValueError(f"norm_stats: no statistics for norm kind {spec.kind!r}")


def normalize(c: Tensor, spec: NormSpec) -> Tensor:
    """N(c) = weight * (c - mean_S) * invstd_S + bias, or c for kind "none"."""
    if spec.kind == "none":
        return c
    mean, invstd = norm_stats(c, spec)
    return (c - mean) * invstd * _bc(spec.weight) + _bc(spec.bias)


def norm_vjp(dy: Tensor, xhat: Tensor | None, invstd: Tensor | None, spec: NormSpec) -> Tensor:
    """N^T(dy): the gradient of N at c w.r.t. c, statistics included."""
    if spec.kind == "none":
        return dy
    dxh = dy * _bc(spec.weight)
    if spec.kind == "batch":
        m1 = dxh.mean(dim=(0, 2, 3), keepdim=True)
        m2 = (dxh * xhat).mean(dim=(0, 2, 3), keepdim=True)
    else:
        shape = dxh.shape
        rep = shape[1] // spec.groups
        m1 = _group_view(dxh, spec.groups).mean(dim=2, keepdim=True)
        m2 = _group_view(dxh * xhat, spec.groups).mean(dim=2, keepdim=True)
        m1 = m1.repeat_interleave(rep, dim=1).reshape(shape[0], shape[1], 1, 1)
        m2 = m2.repeat_interleave(rep, dim=1).reshape(shape[0], shape[1], 1, 1)
    return invstd * (dxh - m1 - xhat * m2)


# --------------------------------------------------------------------------------------------
# Forward passes


def gate_inh(h: Tensor, u1_weight: Tensor, u1_bias: Tensor) -> Tensor:
    """hg = h * sigma(U1 h + b1): the input of the inhibitory conv."""
    return h * torch.sigmoid(F.conv2d(h, u1_weight, u1_bias))


def inhibit(
    c1_raw: Tensor, x: Tensor, h: Tensor, norm: NormSpec, alpha: Tensor, mu: Tensor,
    u2_weight: Tensor, u2_bias: Tensor,
) -> tuple[Tensor, Tensor]:
    """h1 = sp(x - sp(N_inh(c1_raw) * (alpha h + mu))) and the mix gate g2 = sigma(U2 h1 + b2)."""
    c1 = normalize(c1_raw, norm)
    h1 = F.softplus(x - F.softplus(c1 * (alpha * h + mu)))
    return h1, torch.sigmoid(F.conv2d(h1, u2_weight, u2_bias))


def excite_mix(
    c2_raw: Tensor, h: Tensor, h1: Tensor, g2: Tensor, norm: NormSpec, kappa: Tensor,
    gamma: Tensor, omega: Tensor,
) -> Tensor:
    """F = sp((1 - g2) h + g2 sp(kappa h1 + gamma c2 + omega h1 c2)), c2 = N_exc(c2_raw)."""
    c2 = normalize(c2_raw, norm)
    hh = F.softplus(kappa * h1 + gamma * c2 + omega * h1 * c2)
    return F.softplus((1 - g2) * h + g2 * hh)


def step(
    x: Tensor, h: Tensor, p: HGRUParams, conv: ConvFn = conv_same,
) -> Tensor:
    """One hGRU step F(x, h) from the three passes and two convs."""
    hg = gate_inh(h, p.u1_weight, p.u1_bias)
    h1, g2 = inhibit(conv(hg, p.w_inh), x, h, p.norm_inh, p.alpha, p.mu, p.u2_weight, p.u2_bias)
    return excite_mix(conv(h1, p.w_exc), h, h1, g2, p.norm_exc, p.kappa, p.gamma, p.omega)


# --------------------------------------------------------------------------------------------
# Linearisation and VJP passes


class Factors(NamedTuple):
    """Everything the VJP needs at a fixed (x, h); each (B, C, H, W) unless noted."""

    state: Tensor  # F(x, h)
    s_z: Tensor  # sigma(z)
    g2: Tensor
    hh_minus_h: Tensor  # hh - h
    s_e: Tensor  # sigma(e)
    dc2_coef: Tensor  # gamma + omega * h1
    dh1_coef: Tensor  # kappa + omega * c2
    g2_slope: Tensor  # g2 * (1 - g2)
    xhat2: Tensor | None  # normalised exc conv output (None for norm "none")
    invstd2: Tensor | None  # broadcastable to (B, C, 1, 1)
    dq_coef: Tensor  # -sigma(x - sp(q)) * sigma(q)
    dc1_coef: Tensor  # alpha * h + mu
    dh_q_coef: Tensor  # c1 * alpha
    xhat1: Tensor | None
    invstd1: Tensor | None
    g1: Tensor
    hg1_slope: Tensor  # h * g1 * (1 - g1)


def _norm_parts(c_raw: Tensor, spec: NormSpec) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if spec.kind == "none":
        return c_raw, None, None
    mean, invstd = norm_stats(c_raw, spec)
    xhat = (c_raw - mean) * invstd
    return xhat * _bc(spec.weight) + _bc(spec.bias), xhat, invstd


def linearize(x: Tensor, h: Tensor, p: HGRUParams, conv: ConvFn = conv_same) -> Factors:
    """The forward step at (x, h) with every derivative factor its VJP needs, computed once."""
    g1 = torch.sigmoid(F.conv2d(h, p.u1_weight, p.u1_bias))
    c1, xhat1, invstd1 = _norm_parts(conv(h * g1, p.w_inh), p.norm_inh)
    a = p.alpha * h + p.mu
    q = c1 * a
    r = x - F.softplus(q)
    h1 = F.softplus(r)
    g2 = torch.sigmoid(F.conv2d(h1, p.u2_weight, p.u2_bias))
    c2, xhat2, invstd2 = _norm_parts(conv(h1, p.w_exc), p.norm_exc)
    e = p.kappa * h1 + p.gamma * c2 + p.omega * h1 * c2
    hh = F.softplus(e)
    z = (1 - g2) * h + g2 * hh
    return Factors(
        state=F.softplus(z), s_z=torch.sigmoid(z), g2=g2, hh_minus_h=hh - h, s_e=torch.sigmoid(e),
        dc2_coef=p.gamma + p.omega * h1, dh1_coef=p.kappa + p.omega * c2, g2_slope=g2 * (1 - g2),
        xhat2=xhat2, invstd2=invstd2, dq_coef=-torch.sigmoid(r) * torch.sigmoid(q), dc1_coef=a,
        dh_q_coef=c1 * p.alpha, xhat1=xhat1, invstd1=invstd1, g1=g1, hg1_slope=h * g1 * (1 - g1),
    )


def vjp_excite_mix(v: Tensor, f: Factors, u2_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From v = dL/dF: (dc2, dh1 without the exc-conv term, dh so far)."""
    dz = v * f.s_z
    de = dz * f.g2 * f.s_e
    dg2 = dz * f.hh_minus_h
    dh1 = de * f.dh1_coef + _mix_t(dg2 * f.g2_slope, u2_weight)
    return de * f.dc2_coef, dh1, dz * (1 - f.g2)


def vjp_inhibit(dh1: Tensor, dh: Tensor, f: Factors) -> tuple[Tensor, Tensor]:
    """From the full dh1: (dc1, dh with the inhibition term added)."""
    dq = dh1 * f.dq_coef
    return dq * f.dc1_coef, dh + dq * f.dh_q_coef


def vjp_gate_inh(dhg: Tensor, dh: Tensor, f: Factors, u1_weight: Tensor) -> Tensor:
    """From dhg = dL/d(h * g1): the final dh."""
    return dh + dhg * f.g1 + _mix_t(dhg * f.hg1_slope, u1_weight)


def vjp(
    v: Tensor, f: Factors, p: HGRUParams,
    conv_t: ConvFn = conv_same_transpose,
) -> Tensor:
    """J^T v at the point :func:`linearize` was taken."""
    dc2, dh1, dh = vjp_excite_mix(v, f, p.u2_weight)
    dh1 = dh1 + conv_t(norm_vjp(dc2, f.xhat2, f.invstd2, p.norm_exc), p.w_exc)
    dc1, dh = vjp_inhibit(dh1, dh, f)
    dhg = conv_t(norm_vjp(dc1, f.xhat1, f.invstd1, p.norm_inh), p.w_inh)
    return vjp_gate_inh(dhg, dh, f, p.u1_weight)
