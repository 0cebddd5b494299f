"""The tracked step's plane passes as Triton kernels: the bodies of ``csrc/cpu/plane_impl.h``
(the math of :mod:`crbp_fast.hgru.reference`), one jit function per pass, behind one kernel.

:func:`plane_pass_kernel` has a grid of ``B * C * blocks`` programs: each takes ``BLOCK`` pixels of one
(b, c) plane, loads the plane's scalars, and runs the pass's body on them: the inputs and outputs
arrive as tuples of pointers (``ins``, ``outs``), and the constexpr masks ``NONE`` (inputs that
read as zeros, the table's None) and ``SKIP`` (outputs not written) select what is compiled, so
each variant is one branch-free body. A pass with per-plane sums writes one float64 partial per
(plane, block) and sum; the host adds a plane's partials (:mod:`crbp_fast.hgru.triton.tracked`).
Loads upcast to ``ACC`` (float32, float64 for float64 maps); stores cast to the output's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import INTERPRETED, _softplus_sigmoid

#: Pixels per program: few large programs for the interpreter (the tests' 13 x 11 planes take
#: two, the second ragged); on GPU 4 per thread of 4 warps (the widest pass keeps 18 maps live).
PLANE_BLOCK, NUM_WARPS = (128, 4) if INTERPRETED else (512, 4)


# --------------------------------------------------------------------------------------------
# Access helpers


@triton.jit
def _ld(ins, I: tl.constexpr, offs, mask, NONE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Input I of the pass (zeros where NONE has bit I)."""
    if (NONE >> I) & 1:
        v = tl.zeros([BLOCK], dtype=ACC)
    else:
        v = tl.load(ins[I] + offs, mask=mask, other=0.0).to(ACC)
    return v


@triton.jit
def _st(outs, O: tl.constexpr, offs, val, mask, SKIP: tl.constexpr):
    """Output O of the pass (not written where SKIP has bit O)."""
    if ((SKIP >> O) & 1) == 0:
        ptr = outs[O]
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum(sums, J: tl.constexpr, val, mask):
    """Partial sum J of this program's pixels, in float64."""
    tl.store(sums + J, tl.sum(tl.where(mask, val.to(tl.float64), 0.0), axis=0))


@triton.jit
def _sc(sc, J: tl.constexpr, ACC: tl.constexpr):
    """Scalar J of this program's plane."""
    return tl.load(sc + J).to(ACC)


# --------------------------------------------------------------------------------------------
# The bodies (each: the comment and formulas of its plane_impl.h twin)


@triton.jit
def _plane_dot(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr,
               ACC: tl.constexpr):
    # sums (a, a b).
    a = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    b = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    _sum(sums, 0, a, mask)
    _sum(sums, 1, a.to(tl.float64) * b.to(tl.float64), mask)


@triton.jit
def _tangent_gate_inh(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    # g1_t = g1 (1 - g1) m1 (m1 = U1 w), hg_t = w g1 + h g1_t.
    w = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    g = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    h = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    m1 = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    gt = g * (1.0 - g) * m1
    _st(outs, 0, offs, gt, mask, SKIP)
    _st(outs, 1, offs, w * g + h * gt, mask, SKIP)


@triton.jit
def _tangent_inhibit(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    # xhat1_t = invstd (c_t - mean(c_t) - xhat1 mean(xhat1 c_t)), c1_t = weight xhat1_t,
    # q_t = c1_t (alpha h + mu) + c1 alpha w, r_t = -sigma(q) q_t, h1_t = sigma(r) r_t.
    ct = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    xh = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    k_c1 = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    c1 = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    w = _ld(ins, 4, offs, mask, NONE, BLOCK, ACC)
    s_q = _ld(ins, 5, offs, mask, NONE, BLOCK, ACC)
    s_r = _ld(ins, 6, offs, mask, NONE, BLOCK, ACC)
    invstd = _sc(sc, 0, ACC)
    m_t = _sc(sc, 1, ACC)
    m_xt = _sc(sc, 2, ACC)
    weight = _sc(sc, 3, ACC)
    alpha = _sc(sc, 4, ACC)
    xt = invstd * (ct - m_t - xh * m_xt)
    c1t = weight * xt
    qt = c1t * k_c1 + c1 * (alpha * w)
    rt = -s_q * qt
    _st(outs, 0, offs, xt, mask, SKIP)
    _st(outs, 1, offs, c1t, mask, SKIP)
    _st(outs, 2, offs, qt, mask, SKIP)
    _st(outs, 3, offs, rt, mask, SKIP)
    _st(outs, 4, offs, s_r * rt, mask, SKIP)


@triton.jit
def _tangent_excite_mix(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
    # The forward tangent after the exc conv (its norm, e, hh, z), then the tangent of the
    # column-sum pass down to dc2_t, with the per-plane sums of the kappa, gamma, omega gradients
    # and of the norm's (dc2_t xhat2 + dc2 xhat2_t, dc2_t, dc2 xhat2).
    ct = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    xh = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    w = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    h1t = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    g2t = _ld(ins, 4, offs, mask, NONE, BLOCK, ACC)
    c2 = _ld(ins, 5, offs, mask, NONE, BLOCK, ACC)
    h1 = _ld(ins, 6, offs, mask, NONE, BLOCK, ACC)
    se = _ld(ins, 7, offs, mask, NONE, BLOCK, ACC)
    g = _ld(ins, 8, offs, mask, NONE, BLOCK, ACC)
    hmh = _ld(ins, 9, offs, mask, NONE, BLOCK, ACC)
    sz = _ld(ins, 10, offs, mask, NONE, BLOCK, ACC)
    v = _ld(ins, 11, offs, mask, NONE, BLOCK, ACC)
    dz = _ld(ins, 12, offs, mask, NONE, BLOCK, ACC)
    de = _ld(ins, 13, offs, mask, NONE, BLOCK, ACC)
    k_c2 = _ld(ins, 14, offs, mask, NONE, BLOCK, ACC)
    k_h1 = _ld(ins, 15, offs, mask, NONE, BLOCK, ACC)
    slope = _ld(ins, 16, offs, mask, NONE, BLOCK, ACC)
    dc2 = _ld(ins, 17, offs, mask, NONE, BLOCK, ACC)
    invstd = _sc(sc, 0, ACC)
    m_t = _sc(sc, 1, ACC)
    m_xt = _sc(sc, 2, ACC)
    weight = _sc(sc, 3, ACC)
    kappa = _sc(sc, 4, ACC)
    gamma = _sc(sc, 5, ACC)
    omega = _sc(sc, 6, ACC)
    xt = invstd * (ct - m_t - xh * m_xt)
    c2t = weight * xt
    cross = h1t * c2 + h1 * c2t
    et = kappa * h1t + gamma * c2t + omega * cross
    hht = se * et
    zt = (1.0 - g) * w + g2t * hmh + g * hht
    dzt = sz * (1.0 - sz) * zt + v * sz
    set_ = se * (1.0 - se) * et
    det = dzt * g * se + dz * (g2t * se + g * set_)
    _st(outs, 4, offs, (dzt * hmh + dz * (hht - w)) * slope + dz * hmh * (1.0 - 2.0 * g) * g2t, mask, SKIP)
    _st(outs, 3, offs, dzt * (1.0 - g) - dz * g2t, mask, SKIP)
    dc2t = det * k_c2 + de * omega * h1t
    _st(outs, 1, offs, dc2t, mask, SKIP)
    _st(outs, 2, offs, det * k_h1 + de * omega * c2t, mask, SKIP)
    _st(outs, 0, offs, xt, mask, SKIP)
    _sum(sums, 0, det * h1 + de * h1t, mask)
    _sum(sums, 1, det * c2 + de * c2t, mask)
    _sum(sums, 2, det * h1 * c2 + de * cross, mask)
    _sum(sums, 3, dc2t * xh + dc2 * xt, mask)
    _sum(sums, 4, dc2t, mask)
    _sum(sums, 5, dc2 * xh, mask)


@triton.jit
def _norm_vjp_tangent(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    # dr_t = rel_t dr + invstd (weight dc_t - mean(dxh_t) - xhat_t mean(dxh xhat) - xhat mean(dxh_t xhat + dxh xhat_t)).
    dr = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    dct = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    xt = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    xh = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    rel = _sc(sc, 0, ACC)
    invstd = _sc(sc, 1, ACC)
    weight = _sc(sc, 2, ACC)
    m1 = _sc(sc, 3, ACC)
    m2 = _sc(sc, 4, ACC)
    m3 = _sc(sc, 5, ACC)
    _st(outs, 0, offs, rel * dr + invstd * (weight * dct - m1 - xt * m2 - xh * m3), mask, SKIP)


@triton.jit
def _tangent_vjp_inhibit(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                         BLOCK: tl.constexpr, ACC: tl.constexpr):
    # dx, dh_t and dc1_t after the transposed exc conv (its term dh1_t_extra added here), with the
    # per-plane sums of the alpha and mu gradients and of the inh norm's.
    d = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC) + _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    sr = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    r_t = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    sq = _ld(ins, 4, offs, mask, NONE, BLOCK, ACC)
    q_t = _ld(ins, 5, offs, mask, NONE, BLOCK, ACC)
    dh1 = _ld(ins, 6, offs, mask, NONE, BLOCK, ACC)
    k_q = _ld(ins, 7, offs, mask, NONE, BLOCK, ACC)
    k_c1 = _ld(ins, 8, offs, mask, NONE, BLOCK, ACC)
    dq = _ld(ins, 9, offs, mask, NONE, BLOCK, ACC)
    w = _ld(ins, 10, offs, mask, NONE, BLOCK, ACC)
    c1 = _ld(ins, 11, offs, mask, NONE, BLOCK, ACC)
    c1_t = _ld(ins, 12, offs, mask, NONE, BLOCK, ACC)
    h = _ld(ins, 13, offs, mask, NONE, BLOCK, ACC)
    dh_t = _ld(ins, 14, offs, mask, NONE, BLOCK, ACC)
    xh = _ld(ins, 15, offs, mask, NONE, BLOCK, ACC)
    dc1 = _ld(ins, 16, offs, mask, NONE, BLOCK, ACC)
    xt = _ld(ins, 17, offs, mask, NONE, BLOCK, ACC)
    alpha = _sc(sc, 0, ACC)
    s_r_t = sr * (1.0 - sr) * r_t
    s_q_t = sq * (1.0 - sq) * q_t
    _st(outs, 0, offs, d * sr + dh1 * s_r_t, mask, SKIP)
    dqt = d * k_q - dh1 * (s_r_t * sq + sr * s_q_t)
    dc1t = dqt * k_c1 + dq * (alpha * w)
    da = dq * c1
    dat = dqt * c1 + dq * c1_t
    _st(outs, 1, offs, dh_t + dat * alpha, mask, SKIP)
    _st(outs, 2, offs, dc1t, mask, SKIP)
    _sum(sums, 0, dat * h + da * w, mask)
    _sum(sums, 1, dat, mask)
    _sum(sums, 2, dc1t * xh + dc1 * xt, mask)
    _sum(sums, 3, dc1t, mask)
    _sum(sums, 4, dc1 * xh, mask)


@triton.jit
def _tangent_vjp_gate_inh(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                          BLOCK: tl.constexpr, ACC: tl.constexpr):
    # dm1 = dhg hg1_slope, dm1_t = dhg_t hg1_slope + dhg (w g1 (1 - g1) + h (1 - 2 g1) g1_t),
    # dh_t += dhg_t g1 + dhg g1_t (the U1^T term is the caller's mix of dm1_t).
    dt = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    d = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    slope = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    w = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    g = _ld(ins, 4, offs, mask, NONE, BLOCK, ACC)
    h = _ld(ins, 5, offs, mask, NONE, BLOCK, ACC)
    g1_t = _ld(ins, 6, offs, mask, NONE, BLOCK, ACC)
    dh_t = _ld(ins, 7, offs, mask, NONE, BLOCK, ACC)
    _st(outs, 1, offs, d * slope, mask, SKIP)
    _st(outs, 0, offs, dt * slope + d * (w * (g * (1.0 - g)) + h * (1.0 - 2.0 * g) * g1_t), mask, SKIP)
    _st(outs, 2, offs, dh_t + dt * g + d * g1_t, mask, SKIP)


@triton.jit
def _tracked_inhibit(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    # The inhibition of linearize_tracked: c1 = N(c1_raw), its xhat1, a = alpha h + mu, sigma(q),
    # sigma(r), -sigma(r) sigma(q), c1 alpha and h1 = sp(r), r = x - sp(c1 a).
    raw = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    x = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    h = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    mean = _sc(sc, 0, ACC)
    invstd = _sc(sc, 1, ACC)
    weight = _sc(sc, 2, ACC)
    bias = _sc(sc, 3, ACC)
    alpha = _sc(sc, 4, ACC)
    mu = _sc(sc, 5, ACC)
    xh = (raw - mean) * invstd
    c1 = xh * weight + bias
    gate = alpha * h + mu
    sp_q, sig_q = _softplus_sigmoid(c1 * gate)
    h1, sig_r = _softplus_sigmoid(x - sp_q)
    _st(outs, 0, offs, c1, mask, SKIP)
    _st(outs, 1, offs, xh, mask, SKIP)
    _st(outs, 2, offs, gate, mask, SKIP)
    _st(outs, 3, offs, sig_q, mask, SKIP)
    _st(outs, 4, offs, sig_r, mask, SKIP)
    _st(outs, 5, offs, -sig_r * sig_q, mask, SKIP)
    _st(outs, 6, offs, c1 * alpha, mask, SKIP)
    _st(outs, 7, offs, h1, mask, SKIP)


@triton.jit
def _tracked_excite_mix(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
    # The excitation and mix of linearize_tracked: F, sigma(z), hh - h, sigma(e), gamma + omega h1,
    # kappa + omega c2, g2 (1 - g2), xhat2 and c2 = N(c2_raw).
    raw = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    h = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    u = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    g = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    mean = _sc(sc, 0, ACC)
    invstd = _sc(sc, 1, ACC)
    weight = _sc(sc, 2, ACC)
    bias = _sc(sc, 3, ACC)
    kappa = _sc(sc, 4, ACC)
    gamma = _sc(sc, 5, ACC)
    omega = _sc(sc, 6, ACC)
    xh = (raw - mean) * invstd
    c2 = xh * weight + bias
    hh, sig_e = _softplus_sigmoid(kappa * u + gamma * c2 + omega * u * c2)
    f, sig_z = _softplus_sigmoid((1.0 - g) * h + g * hh)
    _st(outs, 0, offs, f, mask, SKIP)
    _st(outs, 1, offs, sig_z, mask, SKIP)
    _st(outs, 2, offs, hh - h, mask, SKIP)
    _st(outs, 3, offs, sig_e, mask, SKIP)
    _st(outs, 4, offs, gamma + omega * u, mask, SKIP)
    _st(outs, 5, offs, kappa + omega * c2, mask, SKIP)
    _st(outs, 6, offs, g * (1.0 - g), mask, SKIP)
    _st(outs, 7, offs, xh, mask, SKIP)
    _st(outs, 8, offs, c2, mask, SKIP)


@triton.jit
def _column_sums_excite_mix(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                            BLOCK: tl.constexpr, ACC: tl.constexpr):
    # The column-sum pass at v = 1 after the exc conv: de = s_z g2 s_e, dm2 = s_z (hh - h) g2 (1 - g2),
    # dc2 = de (gamma + omega h1).
    sz = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    g = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    se = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    hmh = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    slope = _ld(ins, 4, offs, mask, NONE, BLOCK, ACC)
    k_c2 = _ld(ins, 5, offs, mask, NONE, BLOCK, ACC)
    de = sz * g * se
    _st(outs, 0, offs, de, mask, SKIP)
    _st(outs, 1, offs, sz * hmh * slope, mask, SKIP)
    _st(outs, 2, offs, de * k_c2, mask, SKIP)


@triton.jit
def _column_sums_inhibit(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                         BLOCK: tl.constexpr, ACC: tl.constexpr):
    # After the transposed exc conv: dh1 = de dh1_coef + U2^T dm2 + the conv term, dq, dc1, and dh =
    # s_z (1 - g2) + dq c1 alpha (the rest of u is the caller's gate VJP).
    de = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    k_h1 = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    mix = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    cv = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    k_q = _ld(ins, 4, offs, mask, NONE, BLOCK, ACC)
    k_c1 = _ld(ins, 5, offs, mask, NONE, BLOCK, ACC)
    sz = _ld(ins, 6, offs, mask, NONE, BLOCK, ACC)
    g = _ld(ins, 7, offs, mask, NONE, BLOCK, ACC)
    k_h = _ld(ins, 8, offs, mask, NONE, BLOCK, ACC)
    dh1 = de * k_h1 + mix + cv
    dq = dh1 * k_q
    _st(outs, 0, offs, dh1, mask, SKIP)
    _st(outs, 1, offs, dq, mask, SKIP)
    _st(outs, 2, offs, dq * k_c1, mask, SKIP)
    _st(outs, 3, offs, sz * (1.0 - g) + dq * k_h, mask, SKIP)


@triton.jit
def _step_vjp_excite_mix(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                         BLOCK: tl.constexpr, ACC: tl.constexpr):
    # The tracked step's VJP after the exc conv: dm2, dc2, dh1 (without the U2^T and conv terms) and
    # dh so far, with the per-plane sums of the kappa, gamma, omega gradients, of the exc norm's
    # (dc2 xhat2, dc2) and of dm2 (the U2 bias gradient).
    v = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    sz = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    g = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    se = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    hmh = _ld(ins, 4, offs, mask, NONE, BLOCK, ACC)
    slope = _ld(ins, 5, offs, mask, NONE, BLOCK, ACC)
    k_c2 = _ld(ins, 6, offs, mask, NONE, BLOCK, ACC)
    k_h1 = _ld(ins, 7, offs, mask, NONE, BLOCK, ACC)
    h1 = _ld(ins, 8, offs, mask, NONE, BLOCK, ACC)
    c2 = _ld(ins, 9, offs, mask, NONE, BLOCK, ACC)
    xh = _ld(ins, 10, offs, mask, NONE, BLOCK, ACC)
    dz = v * sz
    de = dz * g * se
    dm2 = dz * hmh * slope
    dc2 = de * k_c2
    _st(outs, 0, offs, dm2, mask, SKIP)
    _st(outs, 1, offs, dc2, mask, SKIP)
    _st(outs, 2, offs, de * k_h1, mask, SKIP)
    _st(outs, 3, offs, dz * (1.0 - g), mask, SKIP)
    _sum(sums, 0, de * h1, mask)
    _sum(sums, 1, de * c2, mask)
    _sum(sums, 2, de * h1 * c2, mask)
    _sum(sums, 3, dc2 * xh, mask)
    _sum(sums, 4, dc2, mask)
    _sum(sums, 5, dm2, mask)


@triton.jit
def _step_vjp_inhibit(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    # After the transposed exc conv (its term dh1_extra added here): dx, dc1 and dh with the
    # inhibition's term, with the per-plane sums of the alpha and mu gradients and the inh norm's.
    d = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC) + _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    sr = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    k_q = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    k_c1 = _ld(ins, 4, offs, mask, NONE, BLOCK, ACC)
    c1 = _ld(ins, 5, offs, mask, NONE, BLOCK, ACC)
    h = _ld(ins, 6, offs, mask, NONE, BLOCK, ACC)
    dh = _ld(ins, 7, offs, mask, NONE, BLOCK, ACC)
    xh = _ld(ins, 8, offs, mask, NONE, BLOCK, ACC)
    alpha = _sc(sc, 0, ACC)
    dq = d * k_q
    dc1 = dq * k_c1
    da = dq * c1
    _st(outs, 0, offs, d * sr, mask, SKIP)
    _st(outs, 1, offs, dc1, mask, SKIP)
    _st(outs, 2, offs, dh + da * alpha, mask, SKIP)
    _sum(sums, 0, da * h, mask)
    _sum(sums, 1, da, mask)
    _sum(sums, 2, dc1 * xh, mask)
    _sum(sums, 3, dc1, mask)


@triton.jit
def _native_factors(ins, outs, offs, mask, sc, sums, NONE: tl.constexpr, SKIP: tl.constexpr,
                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    # The fused VJP's factors from the tracked step's: products of the reference factors.
    k_q = _ld(ins, 0, offs, mask, NONE, BLOCK, ACC)
    k_c1 = _ld(ins, 1, offs, mask, NONE, BLOCK, ACC)
    k_hq = _ld(ins, 2, offs, mask, NONE, BLOCK, ACC)
    sz = _ld(ins, 3, offs, mask, NONE, BLOCK, ACC)
    g = _ld(ins, 4, offs, mask, NONE, BLOCK, ACC)
    se = _ld(ins, 5, offs, mask, NONE, BLOCK, ACC)
    k_c2 = _ld(ins, 6, offs, mask, NONE, BLOCK, ACC)
    k_h1 = _ld(ins, 7, offs, mask, NONE, BLOCK, ACC)
    hmh = _ld(ins, 8, offs, mask, NONE, BLOCK, ACC)
    slope = _ld(ins, 9, offs, mask, NONE, BLOCK, ACC)
    de = sz * g * se
    _st(outs, 0, offs, k_q * k_c1, mask, SKIP)
    _st(outs, 1, offs, k_q * k_hq, mask, SKIP)
    _st(outs, 2, offs, de * k_c2, mask, SKIP)
    _st(outs, 3, offs, de * k_h1, mask, SKIP)
    _st(outs, 4, offs, sz * hmh * slope, mask, SKIP)
    _st(outs, 5, offs, sz * (1.0 - g), mask, SKIP)


# --------------------------------------------------------------------------------------------
# The kernel


@triton.jit
def plane_pass_kernel(ins, outs, scalars, sums, HW, BLOCKS, PASS: tl.constexpr, NS: tl.constexpr,
                      NSUM: tl.constexpr, NONE: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr,
                      ACC: tl.constexpr):
    """Pass ``PASS`` (its number in csrc/cpu/plane_passes.h) over ``BLOCK`` pixels of one plane
    (module docstring): program ``plane * BLOCKS + blk`` of a 1-D grid (so neither the planes nor
    a plane's blocks meet the 65535 limit of a grid's second dimension); ``scalars`` (planes, NS),
    ``sums`` (planes, BLOCKS, NSUM) float64 partials."""
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // BLOCKS
    blk = pid % BLOCKS
    p = blk * BLOCK + tl.arange(0, BLOCK)
    mask = p < HW
    offs = plane * HW + p
    sc = scalars + plane * NS
    sm = sums + (plane * BLOCKS + blk) * NSUM
    if PASS == 0:  # plane_dot
        _plane_dot(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 1:  # tangent_gate_inh
        _tangent_gate_inh(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 2:  # tangent_inhibit
        _tangent_inhibit(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 3:  # tangent_excite_mix
        _tangent_excite_mix(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 4:  # norm_vjp_tangent
        _norm_vjp_tangent(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 5:  # tangent_vjp_inhibit
        _tangent_vjp_inhibit(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 6:  # tangent_vjp_gate_inh
        _tangent_vjp_gate_inh(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 7:  # tracked_inhibit
        _tracked_inhibit(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 8:  # tracked_excite_mix
        _tracked_excite_mix(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 9:  # column_sums_excite_mix
        _column_sums_excite_mix(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 10:  # column_sums_inhibit
        _column_sums_inhibit(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 11:  # step_vjp_excite_mix
        _step_vjp_excite_mix(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    elif PASS == 12:  # step_vjp_inhibit
        _step_vjp_inhibit(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
    else:
        tl.static_assert(PASS == 13, "unknown plane pass")
        _native_factors(ins, outs, offs, mask, sc, sm, NONE, SKIP, BLOCK, ACC)
