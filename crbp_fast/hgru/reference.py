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
derivatives commute). :func:`column_sums` is the pass at v = 1 (u and its maps, suffix-free
below); :func:`lcp_tangent` its tangent along w, written out (suffix ``_t``: the tangent of a
forward map, e.g. ``h1_t = sigma(r) r_t``; ``d*_t``: the tangent of a VJP map)::

    hg_t  = w g1 + h g1 (1 - g1) U1 w ;  c1_raw_t = W_inh (*) hg_t      # tangent of the forward
    xhat_t = invstd (c_t - mean_S(c_t) - xhat mean_S(xhat c_t)) ;  invstd_t / invstd = -invstd mean_S(xhat c_t)
    q_t = c1_t (alpha h + mu) + c1 alpha w ;  r_t = -sigma(q) q_t ;  h1_t = sigma(r) r_t
    g2_t = g2 (1 - g2) U2 h1_t ;  c2_raw_t = W_exc (*) h1_t ;  e_t, hh_t = sigma(e) e_t
    z_t = (1 - g2) w + g2_t (hh - h) + g2 hh_t
    dz_t = sigma'(z) z_t, then each line of step_vjp differentiated by the product rule, e.g.
    dr2_t = (invstd_t / invstd) dr2 + invstd (dxh_t - mean_S(dxh_t) - xhat_t m2 - xhat mean_S(dxh_t xhat + dxh xhat_t))
    dW_exc = h1_t (*)^w dr2 + h1 (*)^w dr2_t ;  dx = dh1_t sigma(r) + dh1 sigma'(r) r_t

Two convs, two transposed convs and two weight gradients (each one call over its pair of
terms), with five elementwise passes between them (:func:`tangent_gate_inh` ...
:func:`tangent_vjp_gate_inh`). Every map of step_vjp(v) enters these linearly with the same
coefficients, so seeding dz_t with v sigma(z) adds the tracked step's own backward at no
further conv: :mod:`crbp_fast.hgru.tracked` differentiates the tracked step and the penalty in
this one pass. :func:`lcp_gradient_forward_mode` computes the same by autograd's forward mode (a
cross-check; slower).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

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


# The 1x1 maps as batched matrix products on (B, C, H W) views of the maps, the weight
# broadcast over the batch: einsum (and matmul of a matrix by a batch) permuted and copied the
# maps (a third of the native tangent passes' time at B2-C25-150x150).
def _batched_mix(x: Tensor, m: Tensor) -> Tensor:
    """sum_c m[o, c] x[b, c] for a (O, C) matrix m."""
    b, c, hgt, wid = x.shape
    return torch.bmm(m.unsqueeze(0).expand(b, -1, -1), x.reshape(b, c, hgt * wid)).reshape(b, m.shape[0], hgt, wid)


def _mix(x: Tensor, w: Tensor) -> Tensor:
    """1x1 channel mix without bias: sum_c w[o, c] x[b, c]."""
    return _batched_mix(x, w.reshape(w.shape[0], w.shape[1]))


def _mix_t(x: Tensor, w: Tensor) -> Tensor:
    """Transpose of :func:`_mix`."""
    return _batched_mix(x, w.reshape(w.shape[0], w.shape[1]).t())


def _pixel_outer(a: Tensor, b: Tensor, like: Tensor) -> Tensor:
    """sum over (B, H, W) of a[b, o] b[b, c], as the (O, C, 1, 1) 1x1 weight ``like``."""
    n, o, hgt, wid = a.shape
    per_sample = torch.bmm(a.reshape(n, o, hgt * wid), b.reshape(n, b.shape[1], hgt * wid).transpose(1, 2))
    return per_sample.sum(0).reshape(like.shape)


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


def set_mean(t: Tensor, spec: NormSpec) -> Tensor:
    """The mean of ``t`` over each reduction set of ``spec`` ("batch" or "group"), broadcastable to t."""
    if spec.kind == "batch":
        return t.mean(dim=(0, 2, 3), keepdim=True)
    b, ch = t.shape[:2]
    m = _group_view(t, spec.groups).mean(dim=2, keepdim=True)
    return m.repeat_interleave(ch // spec.groups, dim=1).reshape(b, ch, 1, 1)


def norm_vjp(dy: Tensor, xhat: Tensor | None, invstd: Tensor | None, spec: NormSpec) -> Tensor:
    """N^T(dy): the gradient of N at c w.r.t. c, statistics included."""
    if spec.kind == "none":
        return dy
    dxh = dy * _bc(spec.weight)
    return invstd * (dxh - set_mean(dxh, spec) - xhat * set_mean(dxh * xhat, spec))


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

Pairs = Union[Tensor, Sequence[Tensor]]
#: ``weight_grad(x, dy, k)``: x, dy tensors, or equal-length tuples of tensors (the gradient
#: summed over the pairs, as of their batch concatenation).
def concat_pairs(x: Pairs, dy: Pairs) -> tuple[Tensor, Tensor]:
    """(x, dy) of a weight gradient as two tensors: tuples are concatenated along the batch."""
    if isinstance(x, Tensor) and isinstance(dy, Tensor):
        return x, dy
    if isinstance(x, Tensor) or isinstance(dy, Tensor) or len(x) != len(dy) or not len(x):
        raise ValueError("x, dy: expected two tensors or two tuples of tensors of one non-zero length, got "
                         f"{type(x).__name__} and {type(dy).__name__}")
    return (x[0], dy[0]) if len(x) == 1 else (torch.cat(tuple(x)), torch.cat(tuple(dy)))


WeightGradFn = Callable[[Pairs, Pairs, int], Tensor]


def conv_same_weight_grad(x: Pairs, dy: Pairs, kernel_size: int) -> Tensor:
    """d/dw of sum(dy * conv_same(x, w)) for a k x k kernel: (B, C, H, W), (B, O, H, W) ->
    (O, C, k, k), dw[o, c] = sum_b dy[b, o] (*) x[b, c], as a plain conv2d (differentiable,
    forward-mode included). Tuples x = (x_1, ...), dy = (dy_1, ...) give the sum over the pairs."""
    x, dy = concat_pairs(x, dy)
    return F.conv2d(x.transpose(0, 1), dy.transpose(0, 1), padding=kernel_size // 2).transpose(0, 1)


class Tracked(NamedTuple):
    """The forward maps the parameter gradients need beyond :class:`Factors`, (B, C, H, W) each."""

    h: Tensor
    hg: Tensor  # h * g1: the inhibitory conv's input
    h1: Tensor  # the excitatory conv's input
    c1: Tensor  # N_inh(c1_raw)
    c2: Tensor  # N_exc(c2_raw)
    s_r: Tensor  # sigma(x - sp(q)) = d h1 / d x
    s_q: Tensor  # sigma(q)


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
    s_r, s_q = torch.sigmoid(r), torch.sigmoid(q)
    factors = Factors(
        state=F.softplus(z), s_z=torch.sigmoid(z), g2=g2, hh_minus_h=hh - h, s_e=torch.sigmoid(e),
        dc2_coef=p.gamma + p.omega * h1, dh1_coef=p.kappa + p.omega * c2, g2_slope=g2 * (1 - g2),
        xhat2=xhat2, invstd2=invstd2, dq_coef=-s_r * s_q, dc1_coef=a,
        dh_q_coef=c1 * p.alpha, xhat1=xhat1, invstd1=invstd1, g1=g1, hg1_slope=h * g1 * (1 - g1),
    )
    return factors, Tracked(h=h, hg=hg, h1=h1, c1=c1, c2=c2, s_r=s_r, s_q=s_q)


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
    du2 = _pixel_outer(dm2, t.h1, p.u2_weight)
    dnorm_exc = _norm_param_grads(dc2, f.xhat2, p.norm_exc)
    dr2 = norm_vjp(dc2, f.xhat2, f.invstd2, p.norm_exc)
    dh1 = dh1 + conv_t(dr2, p.w_exc)  # before the weight gradient: an FFT engine reuses dr2's transform
    dw_exc = weight_grad(t.h1, dr2, k)
    dx = dh1 * t.s_r
    dq = dh1 * f.dq_coef
    dc1 = dq * f.dc1_coef
    da = dq * t.c1
    dalpha, dmu = _channel_sum(da * t.h, p.alpha), _channel_sum(da, p.mu)
    dh = dh + da * p.alpha
    dnorm_inh = _norm_param_grads(dc1, f.xhat1, p.norm_inh)
    dr1 = norm_vjp(dc1, f.xhat1, f.invstd1, p.norm_inh)
    dhg = conv_t(dr1, p.w_inh)
    dw_inh = weight_grad(t.hg, dr1, k)
    dm1 = dhg * f.hg1_slope
    dh = dh + dhg * f.g1 + _mix_t(dm1, p.u1_weight)
    du1 = _pixel_outer(dm1, t.h, p.u1_weight)
    return StepGrads(
        x=dx, h=dh, u1_weight=du1, u1_bias=dm1.sum(dim=(0, 2, 3)), u2_weight=du2, u2_bias=dm2.sum(dim=(0, 2, 3)),
        w_inh=dw_inh, w_exc=dw_exc, alpha=dalpha, mu=dmu, kappa=dkappa, gamma=dgamma, omega=domega,
        norm_inh=dnorm_inh, norm_exc=dnorm_exc,
    )


class ColumnSumMaps(NamedTuple):
    """The maps of :func:`step_vjp` at v = 1 (the pass that gives u = J^T 1) which the LCP
    penalty's gradient differentiates, (B, C, H, W) each."""

    dz: Tensor
    de: Tensor
    dm2: Tensor
    dc2: Tensor
    dr2: Tensor
    dh1: Tensor  # with the transposed exc conv's term
    dq: Tensor
    dc1: Tensor
    dr1: Tensor
    dhg: Tensor


def column_sums(f: Factors, p: HGRUParams, conv_t: ConvFn = conv_same_transpose) -> tuple[Tensor, ColumnSumMaps]:
    """u = J^T 1, the column sums of J = dF/dh (the h part of :func:`step_vjp` at v = 1, no
    parameter gradients), and the maps of that pass."""
    dz = f.s_z
    de = dz * f.g2 * f.s_e
    dm2 = dz * f.hh_minus_h * f.g2_slope
    dc2 = de * f.dc2_coef
    dr2 = norm_vjp(dc2, f.xhat2, f.invstd2, p.norm_exc)
    dh1 = de * f.dh1_coef + _mix_t(dm2, p.u2_weight) + conv_t(dr2, p.w_exc)
    dq = dh1 * f.dq_coef
    dc1 = dq * f.dc1_coef
    dr1 = norm_vjp(dc1, f.xhat1, f.invstd1, p.norm_inh)
    dhg = conv_t(dr1, p.w_inh)
    u = dz * (1 - f.g2) + dq * f.dh_q_coef + dhg * f.g1 + _mix_t(dhg * f.hg1_slope, p.u1_weight)
    return u, ColumnSumMaps(dz=dz, de=de, dm2=dm2, dc2=dc2, dr2=dr2, dh1=dh1, dq=dq, dc1=dc1, dr1=dr1, dhg=dhg)


def _norm_tangent(c_raw_t: Tensor, xhat: Tensor | None, invstd: Tensor | None,
                  spec: NormSpec) -> tuple[Tensor, Tensor | None]:
    """The tangent of xhat for a tangent of the raw conv output, and that of invstd relative
    to invstd (d invstd / invstd = -invstd mean_S(xhat dc)); (c_raw_t, None) for norm "none"."""
    if spec.kind == "none":
        return c_raw_t, None
    m2 = set_mean(xhat * c_raw_t, spec)
    return invstd * (c_raw_t - set_mean(c_raw_t, spec) - xhat * m2), -invstd * m2


def _norm_vjp_tangent(dc: Tensor, dc_t: Tensor, xhat: Tensor | None, xhat_t: Tensor | None,
                      invstd: Tensor | None, invstd_rel_t: Tensor | None, dr: Tensor, spec: NormSpec) -> Tensor:
    """The tangent of dr = :func:`norm_vjp` (dc) for tangents of dc, xhat and invstd."""
    if spec.kind == "none":
        return dc_t
    weight = _bc(spec.weight)
    dxh, dxh_t = dc * weight, dc_t * weight
    m2 = set_mean(dxh * xhat, spec)
    return invstd_rel_t * dr + invstd * (
        dxh_t - set_mean(dxh_t, spec) - xhat_t * m2 - xhat * set_mean(dxh_t * xhat + dxh * xhat_t, spec))


def _scaled_norm(xhat_t: Tensor, spec: NormSpec) -> Tensor:
    return xhat_t if spec.kind == "none" else xhat_t * _bc(spec.weight)


def _norm_param_tangents(dc: Tensor, dc_t: Tensor, xhat: Tensor | None, xhat_t: Tensor | None,
                         spec: NormSpec) -> tuple[Tensor, Tensor] | None:
    if spec.kind == "none":
        return None
    return _channel_sum(dc_t * xhat + dc * xhat_t, spec.weight), _channel_sum(dc_t, spec.bias)


class InhibitTangent(NamedTuple):
    """:func:`tangent_inhibit`'s maps: tangents along w of the forward maps between the convs."""

    xhat1_t: Tensor
    invstd1_rel_t: Tensor | None  # d invstd1 / invstd1 (None for norm "none")
    c1_t: Tensor
    q_t: Tensor
    r_t: Tensor
    h1_t: Tensor  # the excitatory conv's input tangent
    g2_t: Tensor


class ExciteTangent(NamedTuple):
    """:func:`tangent_excite_mix`'s maps and parameter gradients."""

    dh1_t: Tensor  # without the transposed exc conv's term
    dh_t: Tensor
    dr2_t: Tensor  # the transposed exc conv's input
    dm2_t: Tensor
    kappa: Tensor
    gamma: Tensor
    omega: Tensor
    u2_weight: Tensor
    norm_exc: tuple[Tensor, Tensor] | None


class VjpInhibitTangent(NamedTuple):
    """:func:`tangent_vjp_inhibit`'s maps and parameter gradients."""

    dx: Tensor
    dh_t: Tensor
    dr1_t: Tensor  # the transposed inh conv's input
    alpha: Tensor
    mu: Tensor
    norm_inh: tuple[Tensor, Tensor] | None


def tangent_gate_inh(w: Tensor, f: Factors, t: Tracked, p: HGRUParams) -> tuple[Tensor, Tensor]:
    """Pass 1 of :func:`lcp_tangent`, before the inhibitory conv: (g1_t, hg_t), the tangents of
    the inhibition gate and of the conv's input hg = h g1 along w."""
    g1_slope = f.g1 * (1 - f.g1)
    g1_t = g1_slope * _mix(w, p.u1_weight)
    return g1_t, w * f.g1 + t.h * g1_t


def tangent_inhibit(c1_raw_t: Tensor, w: Tensor, f: Factors, t: Tracked, p: HGRUParams) -> InhibitTangent:
    """Pass 2, between the convs: from the inhibitory conv's output tangent, the tangents of its
    normalisation, of q, r, h1 (the excitatory conv's input) and of the excitation gate."""
    xhat1_t, invstd1_rel_t = _norm_tangent(c1_raw_t, f.xhat1, f.invstd1, p.norm_inh)
    c1_t = _scaled_norm(xhat1_t, p.norm_inh)
    q_t = c1_t * f.dc1_coef + t.c1 * (p.alpha * w)
    r_t = -t.s_q * q_t
    h1_t = t.s_r * r_t
    g2_t = f.g2_slope * _mix(h1_t, p.u2_weight)
    return InhibitTangent(xhat1_t, invstd1_rel_t, c1_t, q_t, r_t, h1_t, g2_t)


def tangent_excite_mix(c2_raw_t: Tensor, w: Tensor, it: InhibitTangent, f: Factors, t: Tracked, m: ColumnSumMaps,
                       p: HGRUParams, v: Tensor | None = None) -> ExciteTangent:
    """Pass 3, after the excitatory conv: the rest of the forward tangent (its normalisation,
    e, hh, z), then the tangent of the column-sum pass down to the transposed exc conv's input
    dr2_t, with the gradients of kappa, gamma, omega, U2 and the exc normalisation; ``v`` seeds
    dz with the tracked step's own backward (:func:`lcp_tangent`)."""
    xhat2_t, invstd2_rel_t = _norm_tangent(c2_raw_t, f.xhat2, f.invstd2, p.norm_exc)
    c2_t = _scaled_norm(xhat2_t, p.norm_exc)
    h1_t, g2_t = it.h1_t, it.g2_t
    e_t = p.kappa * h1_t + p.gamma * c2_t + p.omega * (h1_t * t.c2 + t.h1 * c2_t)
    hh_t = f.s_e * e_t
    z_t = (1 - f.g2) * w + g2_t * f.hh_minus_h + f.g2 * hh_t
    # Tangent of the column-sum pass (prefix d, suffix _t), term by term as in step_vjp.
    dz_t = f.s_z * (1 - f.s_z) * z_t
    if v is not None:
        dz_t = dz_t + v * f.s_z
    s_e_t = f.s_e * (1 - f.s_e) * e_t
    de_t = dz_t * f.g2 * f.s_e + m.dz * (g2_t * f.s_e + f.g2 * s_e_t)
    dm2_t = (dz_t * f.hh_minus_h + m.dz * (hh_t - w)) * f.g2_slope + m.dz * f.hh_minus_h * (1 - 2 * f.g2) * g2_t
    dh_t = dz_t * (1 - f.g2) - m.dz * g2_t
    dkappa = _channel_sum(de_t * t.h1 + m.de * h1_t, p.kappa)
    dgamma = _channel_sum(de_t * t.c2 + m.de * c2_t, p.gamma)
    domega = _channel_sum(de_t * t.h1 * t.c2 + m.de * (h1_t * t.c2 + t.h1 * c2_t), p.omega)
    dc2_t = de_t * f.dc2_coef + m.de * p.omega * h1_t
    dh1_t = de_t * f.dh1_coef + m.de * p.omega * c2_t + _mix_t(dm2_t, p.u2_weight)
    du2 = _pixel_outer(dm2_t, t.h1, p.u2_weight) + _pixel_outer(m.dm2, h1_t, p.u2_weight)
    dnorm_exc = _norm_param_tangents(m.dc2, dc2_t, f.xhat2, xhat2_t, p.norm_exc)
    dr2_t = _norm_vjp_tangent(m.dc2, dc2_t, f.xhat2, xhat2_t, f.invstd2, invstd2_rel_t, m.dr2, p.norm_exc)
    return ExciteTangent(dh1_t, dh_t, dr2_t, dm2_t, dkappa, dgamma, domega, du2, dnorm_exc)


def tangent_vjp_inhibit(dh1_t: Tensor, dh_t: Tensor, w: Tensor, it: InhibitTangent, f: Factors, t: Tracked,
                        m: ColumnSumMaps, p: HGRUParams, dh1_t_extra: Tensor | None = None) -> VjpInhibitTangent:
    """Pass 4, after the transposed exc conv (its term ``dh1_t_extra``, added to ``dh1_t``): dx,
    the tangents of dq, dc1 down to the transposed inh conv's input dr1_t, with the gradients of
    alpha, mu and the inh normalisation."""
    if dh1_t_extra is not None:
        dh1_t = dh1_t + dh1_t_extra
    s_r_t = t.s_r * (1 - t.s_r) * it.r_t
    s_q_t = t.s_q * (1 - t.s_q) * it.q_t
    dx = dh1_t * t.s_r + m.dh1 * s_r_t
    dq_t = dh1_t * f.dq_coef - m.dh1 * (s_r_t * t.s_q + t.s_r * s_q_t)
    dc1_t = dq_t * f.dc1_coef + m.dq * (p.alpha * w)
    da, da_t = m.dq * t.c1, dq_t * t.c1 + m.dq * it.c1_t
    dalpha, dmu = _channel_sum(da_t * t.h + da * w, p.alpha), _channel_sum(da_t, p.mu)
    dh_t = dh_t + da_t * p.alpha
    dnorm_inh = _norm_param_tangents(m.dc1, dc1_t, f.xhat1, it.xhat1_t, p.norm_inh)
    dr1_t = _norm_vjp_tangent(m.dc1, dc1_t, f.xhat1, it.xhat1_t, f.invstd1, it.invstd1_rel_t, m.dr1, p.norm_inh)
    return VjpInhibitTangent(dx, dh_t, dr1_t, dalpha, dmu, dnorm_inh)


def tangent_vjp_gate_inh(dhg_t: Tensor, dh_t: Tensor, w: Tensor, g1_t: Tensor, f: Factors, t: Tracked,
                         m: ColumnSumMaps, p: HGRUParams) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 5, after the transposed inh conv: the final dh and the gradients of U1 and its bias."""
    dm1 = m.dhg * f.hg1_slope
    dm1_t = dhg_t * f.hg1_slope + m.dhg * (w * (f.g1 * (1 - f.g1)) + t.h * (1 - 2 * f.g1) * g1_t)
    dh_t = dh_t + dhg_t * f.g1 + m.dhg * g1_t + _mix_t(dm1_t, p.u1_weight)
    du1 = _pixel_outer(dm1_t, t.h, p.u1_weight) + _pixel_outer(dm1, w, p.u1_weight)
    return dh_t, du1, dm1_t.sum(dim=(0, 2, 3))


def lcp_tangent(
    w: Tensor, f: Factors, t: Tracked, m: ColumnSumMaps, p: HGRUParams, conv: ConvFn = conv_same,
    conv_t: ConvFn = conv_same_transpose, weight_grad: WeightGradFn | None = None, v: Tensor | None = None,
    passes=None,
) -> StepGrads:
    """D_h[step_vjp(1)] . w, plus step_vjp(v) when ``v`` is given: the gradient in x, h and every
    parameter of sum_i w_i u_i, u = J^T 1 (module docstring), as explicit passes: the tangent of the forward step along
    h-direction ``w`` (two convs), then the tangent of the column-sum pass (two transposed convs
    and the two weight gradients, each one call over the pair of terms).
    ``m`` is :func:`column_sums`'s maps at the same point (their primal values are reused).

    Five elementwise passes around the four convs, as the step's (a fused backend implements
    them one to one): :func:`tangent_gate_inh`, :func:`tangent_inhibit`,
    :func:`tangent_excite_mix`, :func:`tangent_vjp_inhibit`, :func:`tangent_vjp_gate_inh`.

    Every map of step_vjp(v) enters the tangent pass's maps linearly and with the same
    coefficients, so step_vjp(v) is added by seeding dz with v sigma(z): the tracked step's
    backward and the penalty's gradient in one pass, sharing its convs and weight gradients.

    ``passes``: the module (or any object) whose five functions of those names run the passes,
    this one by default (:mod:`crbp_fast.hgru.native.tracked` and
    :mod:`crbp_fast.hgru.triton.tracked` have fused ones)."""
    ps = passes or sys.modules[__name__]
    weight_grad = weight_grad or conv_same_weight_grad
    k = p.w_inh.shape[-1]
    g1_t, hg_t = ps.tangent_gate_inh(w, f, t, p)
    it = ps.tangent_inhibit(conv(hg_t, p.w_inh), w, f, t, p)
    et = ps.tangent_excite_mix(conv(it.h1_t, p.w_exc), w, it, f, t, m, p, v)
    dh1_t_extra = conv_t(et.dr2_t, p.w_exc)
    dw_exc = weight_grad((it.h1_t, t.h1), (m.dr2, et.dr2_t), k)
    vt = ps.tangent_vjp_inhibit(et.dh1_t, et.dh_t, w, it, f, t, m, p, dh1_t_extra)
    dhg_t = conv_t(vt.dr1_t, p.w_inh)
    dw_inh = weight_grad((hg_t, t.hg), (m.dr1, vt.dr1_t), k)
    dh_t, du1, du1_bias = ps.tangent_vjp_gate_inh(dhg_t, vt.dh_t, w, g1_t, f, t, m, p)
    return StepGrads(
        x=vt.dx, h=dh_t, u1_weight=du1, u1_bias=du1_bias, u2_weight=et.u2_weight,
        u2_bias=et.dm2_t.sum(dim=(0, 2, 3)), w_inh=dw_inh, w_exc=dw_exc, alpha=vt.alpha, mu=vt.mu, kappa=et.kappa,
        gamma=et.gamma, omega=et.omega, norm_inh=vt.norm_inh, norm_exc=et.norm_exc,
    )


def lcp_weights(u: Tensor, target: float) -> tuple[Tensor, Tensor]:
    """The penalty mean(relu(u - target)^2) and w = its gradient in u."""
    excess = torch.relu(u - target)
    return excess.pow(2).mean(), excess * (2 / u.numel())


def lcp_gradient(
    x: Tensor, h: Tensor, p: HGRUParams, target: float = 0.9, conv: ConvFn = conv_same,
    conv_t: ConvFn = conv_same_transpose, weight_grad: WeightGradFn | None = None,
) -> tuple[Tensor, StepGrads]:
    """The LCP penalty mean(relu(1^T J - target)^2) at (x, h) and its gradient in x, h and every
    parameter, by the explicit passes :func:`linearize_tracked`, :func:`column_sums` and
    :func:`lcp_tangent` (module docstring)."""
    f, t = linearize_tracked(x, h, p, conv)
    u, maps = column_sums(f, p, conv_t)
    penalty, w = lcp_weights(u, target)
    return penalty, lcp_tangent(w, f, t, maps, p, conv, conv_t, weight_grad)


def lcp_gradient_forward_mode(
    x: Tensor, h: Tensor, p: HGRUParams, target: float = 0.9, conv: ConvFn = conv_same,
    conv_t: ConvFn = conv_same_transpose, weight_grad: WeightGradFn | None = None,
) -> tuple[Tensor, StepGrads]:
    """:func:`lcp_gradient` by one forward-mode pass of autograd through
    :func:`linearize_tracked` and :func:`step_vjp` (a cross-check of :func:`lcp_tangent`'s
    hand-written tangents; the conv functions must support forward mode)."""
    ones = torch.ones_like(h)
    u, _ = column_sums(linearize(x, h, p, conv), p, conv_t)
    penalty, w = lcp_weights(u, target)
    with forward_ad.dual_level():
        f, t = linearize_tracked(x, forward_ad.make_dual(h, w), p, conv)
        flat = [forward_ad.unpack_dual(g).tangent for g in flat_grads(step_vjp(ones, f, t, p, conv_t, weight_grad))]
    return penalty, unflat_grads(tuple(flat), p)


def flat_grads(g: StepGrads) -> list[Tensor]:
    """The tensors of ``g``: x, h, the eleven parameters in HGRUParams order, then the norms'
    (weight, bias) pairs that exist."""
    out = [g.x, g.h, g.u1_weight, g.u1_bias, g.u2_weight, g.u2_bias, g.w_inh, g.w_exc, g.alpha, g.mu, g.kappa,
           g.gamma, g.omega]
    for pair in (g.norm_inh, g.norm_exc):
        if pair is not None:
            out += list(pair)
    return out


def unflat_grads(flat: tuple[Tensor, ...], p: HGRUParams) -> StepGrads:
    """The inverse of :func:`flat_grads` for the parameters ``p``."""
    head, rest = list(flat[:13]), list(flat[13:])
    pairs = []
    for spec in (p.norm_inh, p.norm_exc):
        if spec.kind == "none":
            pairs.append(None)
        else:
            pairs.append((rest.pop(0), rest.pop(0)))
    return StepGrads(*head, norm_inh=pairs[0], norm_exc=pairs[1])
