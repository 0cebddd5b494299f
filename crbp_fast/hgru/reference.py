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

The tracked step's backward (:func:`step_vjp`) is the same VJP with every parameter and x added,
from the factors and five forward maps (:class:`Tracked`, from :func:`linearize_tracked`);
``sum`` is over (B, H, W) per channel, ``W (*)^w`` the weight gradient of a conv::

    dkappa = sum(de h1) ; dgamma = sum(de c2) ; domega = sum(de h1 c2)
    dm2    = dg2 g2 (1 - g2) ;  dU2 = sum_pixels dm2 h1^T ;  db2 = sum(dm2)
    dN_exc = (sum(dc2 xhat2), sum(dc2))           # weight, bias
    dW_exc = h1 (*)^w dr2
    dx     = dh1 sigma(x - sp(q))
    da     = dq c1 ;  dalpha = sum(da h) ;  dmu = sum(da)
    dN_inh = (sum(dc1 xhat1), sum(dc1)) ;  dW_inh = hg (*)^w dr1
    dm1    = dhg h g1 (1 - g1) ;  dU1 = sum_pixels dm1 h^T ;  db1 = sum(dm1)

The LCP penalty P = mean(relu(u - lambda)^2), u = J^T 1, and its gradient (:func:`lcp_gradient`):
with w = dP/du = 2 relu(u - lambda) / |u| (fixed), sum_i w_i u_i = 1^T J w, so

    dP/d(theta, x, h) = D_h[ step_vjp(1) at h ] . w

the derivative along h, in the direction w, of the step's full backward at v = 1 (the second
derivatives commute): one forward-mode pass through linearize_tracked and step_vjp instead of a
double backward through autograd's graph of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

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


# --------------------------------------------------------------------------------------------
# The tracked step's backward and the LCP penalty's gradient

WeightGradFn = Callable[[Tensor, Tensor, int], Tensor]


def conv_same_weight_grad(x: Tensor, dy: Tensor, kernel_size: int) -> Tensor:
    """d/dw of sum(dy * conv_same(x, w)) for a k x k kernel: (B, C, H, W), (B, O, H, W) ->
    (O, C, k, k), dw[o, c] = sum_b dy[b, o] (*) x[b, c], as a plain conv2d (differentiable,
    forward-mode included)."""
    return F.conv2d(x.transpose(0, 1), dy.transpose(0, 1), padding=kernel_size // 2).transpose(0, 1)


class Tracked(NamedTuple):
    """The forward maps the parameter gradients need beyond :class:`Factors`, (B, C, H, W) each."""

    h: Tensor
    hg: Tensor  # h * g1: the inhibitory conv's input
    h1: Tensor  # the excitatory conv's input
    c1: Tensor  # N_inh(c1_raw)
    c2: Tensor  # N_exc(c2_raw)
    s_r: Tensor  # sigma(x - sp(q)) = d h1 / d x


class StepGrads(NamedTuple):
    """The step's VJP to every input: x, h and each parameter (shaped as in HGRUParams; the
    norms' (weight, bias) pairs are None for norm "none")."""

    x: Tensor
    h: Tensor
    u1_weight: Tensor
    u1_bias: Tensor
    u2_weight: Tensor
    u2_bias: Tensor
    w_inh: Tensor
    w_exc: Tensor
    alpha: Tensor
    mu: Tensor
    kappa: Tensor
    gamma: Tensor
    omega: Tensor
    norm_inh: tuple[Tensor, Tensor] | None
    norm_exc: tuple[Tensor, Tensor] | None


def linearize_tracked(x: Tensor, h: Tensor, p: HGRUParams, conv: ConvFn = conv_same) -> tuple[Factors, Tracked]:
    """:func:`linearize` plus the forward maps of :class:`Tracked`."""
    g1 = torch.sigmoid(F.conv2d(h, p.u1_weight, p.u1_bias))
    hg = h * g1
    c1, xhat1, invstd1 = _norm_parts(conv(hg, p.w_inh), p.norm_inh)
    a = p.alpha * h + p.mu
    q = c1 * a
    r = x - F.softplus(q)
    h1 = F.softplus(r)
    g2 = torch.sigmoid(F.conv2d(h1, p.u2_weight, p.u2_bias))
    c2, xhat2, invstd2 = _norm_parts(conv(h1, p.w_exc), p.norm_exc)
    e = p.kappa * h1 + p.gamma * c2 + p.omega * h1 * c2
    hh = F.softplus(e)
    z = (1 - g2) * h + g2 * hh
    s_r = torch.sigmoid(r)
    factors = Factors(
        state=F.softplus(z), s_z=torch.sigmoid(z), g2=g2, hh_minus_h=hh - h, s_e=torch.sigmoid(e),
        dc2_coef=p.gamma + p.omega * h1, dh1_coef=p.kappa + p.omega * c2, g2_slope=g2 * (1 - g2),
        xhat2=xhat2, invstd2=invstd2, dq_coef=-s_r * torch.sigmoid(q), dc1_coef=a,
        dh_q_coef=c1 * p.alpha, xhat1=xhat1, invstd1=invstd1, g1=g1, hg1_slope=h * g1 * (1 - g1),
    )
    return factors, Tracked(h=h, hg=hg, h1=h1, c1=c1, c2=c2, s_r=s_r)


def _channel_sum(t: Tensor, like: Tensor) -> Tensor:
    """sum over (B, H, W) per channel, shaped like the per-channel parameter ``like``."""
    return t.sum(dim=(0, 2, 3)).reshape(like.shape)


def _norm_param_grads(dc: Tensor, xhat: Tensor | None, spec: NormSpec) -> tuple[Tensor, Tensor] | None:
    if spec.kind == "none":
        return None
    return _channel_sum(dc * xhat, spec.weight), _channel_sum(dc, spec.bias)


def step_vjp(
    v: Tensor, f: Factors, t: Tracked, p: HGRUParams, conv_t: ConvFn = conv_same_transpose,
    weight_grad: WeightGradFn | None = None,
) -> StepGrads:
    """The tracked step's backward: v = dL/dF -> dL/d(x, h, every parameter) (module docstring),
    from the factors and forward maps of :func:`linearize_tracked`. ``weight_grad(x, dy, k)`` is
    the conv engine's weight gradient (:func:`conv_same_weight_grad` by default)."""
    weight_grad = weight_grad or conv_same_weight_grad
    k = p.w_inh.shape[-1]
    dz = v * f.s_z
    de = dz * f.g2 * f.s_e
    dm2 = dz * f.hh_minus_h * f.g2_slope
    dh = dz * (1 - f.g2)
    dkappa, dgamma = _channel_sum(de * t.h1, p.kappa), _channel_sum(de * t.c2, p.gamma)
    domega = _channel_sum(de * t.h1 * t.c2, p.omega)
    dc2 = de * f.dc2_coef
    dh1 = de * f.dh1_coef + _mix_t(dm2, p.u2_weight)
    du2 = torch.einsum("bohw,bchw->oc", dm2, t.h1).reshape(p.u2_weight.shape)
    dnorm_exc = _norm_param_grads(dc2, f.xhat2, p.norm_exc)
    dr2 = norm_vjp(dc2, f.xhat2, f.invstd2, p.norm_exc)
    dw_exc = weight_grad(t.h1, dr2, k)
    dh1 = dh1 + conv_t(dr2, p.w_exc)
    dx = dh1 * t.s_r
    dq = dh1 * f.dq_coef
    dc1 = dq * f.dc1_coef
    da = dq * t.c1
    dalpha, dmu = _channel_sum(da * t.h, p.alpha), _channel_sum(da, p.mu)
    dh = dh + da * p.alpha
    dnorm_inh = _norm_param_grads(dc1, f.xhat1, p.norm_inh)
    dr1 = norm_vjp(dc1, f.xhat1, f.invstd1, p.norm_inh)
    dw_inh = weight_grad(t.hg, dr1, k)
    dhg = conv_t(dr1, p.w_inh)
    dm1 = dhg * f.hg1_slope
    dh = dh + dhg * f.g1 + _mix_t(dm1, p.u1_weight)
    du1 = torch.einsum("bohw,bchw->oc", dm1, t.h).reshape(p.u1_weight.shape)
    return StepGrads(
        x=dx, h=dh, u1_weight=du1, u1_bias=dm1.sum(dim=(0, 2, 3)), u2_weight=du2, u2_bias=dm2.sum(dim=(0, 2, 3)),
        w_inh=dw_inh, w_exc=dw_exc, alpha=dalpha, mu=dmu, kappa=dkappa, gamma=dgamma, omega=domega,
        norm_inh=dnorm_inh, norm_exc=dnorm_exc,
    )


def lcp_gradient(
    x: Tensor, h: Tensor, p: HGRUParams, target: float = 0.9, conv: ConvFn = conv_same,
    conv_t: ConvFn = conv_same_transpose, weight_grad: WeightGradFn | None = None,
    column_sums: Tensor | None = None,
) -> tuple[Tensor, StepGrads]:
    """The LCP penalty mean(relu(1^T J - target)^2) at (x, h) and its gradient in x, h and every
    parameter, as the derivative along h (direction w = dP/du) of :func:`step_vjp` at v = 1
    (module docstring), by one forward-mode pass. ``column_sums``, if given, is u = J^T 1
    already computed (e.g. by a fused VJP); the conv functions must support forward mode."""
    ones = torch.ones_like(h)
    u = column_sums
    if u is None:
        u = vjp(ones, linearize(x, h, p, conv), p, conv_t)
    excess = torch.relu(u - target)
    penalty = excess.pow(2).mean()
    w = 2 * excess / u.numel()
    with forward_ad.dual_level():
        f, t = linearize_tracked(x, forward_ad.make_dual(h, w), p, conv)
        flat = [forward_ad.unpack_dual(g).tangent for g in _flat(step_vjp(ones, f, t, p, conv_t, weight_grad))]
    return penalty, _unflat(tuple(flat), p)


def _flat(g: StepGrads) -> list[Tensor]:
    out = [g.x, g.h, g.u1_weight, g.u1_bias, g.u2_weight, g.u2_bias, g.w_inh, g.w_exc, g.alpha, g.mu, g.kappa,
           g.gamma, g.omega]
    for pair in (g.norm_inh, g.norm_exc):
        if pair is not None:
            out += list(pair)
    return out


def _unflat(flat: tuple[Tensor, ...], p: HGRUParams) -> StepGrads:
    head, rest = list(flat[:13]), list(flat[13:])
    pairs = []
    for spec in (p.norm_inh, p.norm_exc):
        if spec.kind == "none":
            pairs.append(None)
        else:
            pairs.append((rest.pop(0), rest.pop(0)))
    return StepGrads(*head, norm_inh=pairs[0], norm_exc=pairs[1])
