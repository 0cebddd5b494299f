"""Triton kernels of the fused hGRU passes; :mod:`crbp_fast.hgru.reference` holds the math.

Two kernel shapes cover every pass:

- plane kernels, grid ``(B * C, chunks)``: a program walks ``CHUNK`` pixels of one (b, c) plane
  in steps of ``BLOCK``; per-channel and per-(b, c) scalars (the norm's affine) are loaded once.
  The purely elementwise passes and every reduction use this shape; a reduction writes one
  partial per (plane, chunk), and the host combines the partials with tiny (B, C) torch ops.
- tile kernels, grid ``(B, chunks)``: a program walks ``CHUNK`` pixels of one sample in
  ``[BLOCK_C, BLOCK_P]`` tiles holding every channel, for the passes with a 1x1 channel mix
  (U1, U2 and their transposes), computed in-kernel as C rank-1 updates in the accumulation
  dtype (exact fp32, no TF32; an IEEE ``tl.dot`` on these shapes compiled for sm_90 to 150-255
  registers per thread, with spills).

Loads upcast to ``ACC`` (float32, or float64 for float64 tensors), stores cast back to the
output's dtype, addresses are int64. Softplus and sigmoid are evaluated from ``exp(-|x|)``, so
neither overflows, and ``log1p`` is computed without libdevice. The chunk sizes and the autotune
configs depend on whether triton defined these kernels for its interpreter (``INTERPRETED``):
one small config there, a small tuned set on GPU (``CRBP_FAST_TRITON_ONE_CONFIG=1``: its first
config only, no autotuning). The autotune key holds the problem size and the variant switches
(``NORM``, ``LIN``); triton adds the tensors' dtypes.
"""

from __future__ import annotations

import inspect
import os

try:
    import triton
    import triton.language as tl
except Exception as err:  # a missing or broken triton: the backend stays unregistered
    raise ImportError(f"crbp_fast.hgru.triton needs a working triton installation ({err})") from err


# --------------------------------------------------------------------------------------------
# Elementwise helpers


@triton.jit
def _softplus_sigmoid(x):
    """(softplus(x), sigmoid(x)), both from t = exp(-|x|) in (0, 1], so nothing overflows."""
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    d = u - 1.0
    # log1p(t) = log(u) * t / (u - 1) is exact to rounding (Goldberg); t itself where u rounds to 1.
    log1p_t = tl.where(d == 0.0, t, tl.log(u) * (t / tl.where(d == 0.0, 1.0, d)))
    return tl.maximum(x, 0.0) + log1p_t, tl.where(x >= 0.0, 1.0 / u, t / u)


@triton.jit
def _sigmoid_slope(x):
    """(sigmoid(x), sigmoid'(x) = sigmoid(x) sigmoid(-x)), without overflow or cancellation."""
    t = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + t)
    return tl.where(x >= 0.0, r, t * r), t * r * r


@triton.jit
def _load(ptr, offs, mask, ACC: tl.constexpr):
    """Masked load upcast to the accumulation dtype (0 where masked)."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _channel_mix(
    w_ptr, a_ptr, b_ptr, base, p, pmask, C, HW,
    TRANSPOSE: tl.constexpr, PRODUCT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    """The [BLOCK_C, BLOCK_P] tile of W m (W^T m with TRANSPOSE) for a 1x1 weight W (C, C) and
    m = a (a * b with PRODUCT), whose channel rows start at ``base`` (pixels ``p``).

    C rank-1 updates: only the output tile stays in registers; the rows of m are re-read from
    the cache that the pass's own tile load has just filled.
    """
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    out = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    offs = base + p
    for ci in range(0, C):
        if TRANSPOSE:
            w = _load(w_ptr, ci * C + ch, cmask, ACC)
        else:
            w = _load(w_ptr, ch * C + ci, cmask, ACC)
        m = _load(a_ptr, offs, pmask, ACC)
        if PRODUCT:
            m = m * _load(b_ptr, offs, pmask, ACC)
        out += w[:, None] * m[None, :]
        offs += HW
    return out


#: True when triton defined the kernels for its CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = not isinstance(_softplus_sigmoid, triton.runtime.JITFunction)

if INTERPRETED:
    # An interpreted kernel calling a jit helper re-patches triton.language on every call
    # (milliseconds each, thousands per test); the kernels call the plain functions instead,
    # which the interpreter runs unchanged (no chained comparisons or multiple assignments).
    _softplus_sigmoid, _sigmoid_slope, _load, _channel_mix = (
        f.fn for f in (_softplus_sigmoid, _sigmoid_slope, _load, _channel_mix)
    )


# --------------------------------------------------------------------------------------------
# Forward passes


@triton.jit
def _moments_kernel(
    c_ptr, shift_ptr, dmean_ptr, m2_ptr, HW, S,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Per (plane, chunk): a shift (the chunk's first value), the mean of the values minus the
    shift and their sum of squared deviations. Shifted sums keep the variance when |mean| >> std;
    the host merges the chunks by Chan's rule."""
    plane = tl.program_id(0)
    chunk = tl.program_id(1)
    base = plane.to(tl.int64) * HW
    start = chunk * CHUNK
    shift = tl.load(c_ptr + base + start).to(ACC)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    for i in range(0, CHUNK, BLOCK):
        p = start + i + tl.arange(0, BLOCK)
        mask = p < HW
        d = tl.where(mask, _load(c_ptr, base + p, mask, ACC) - shift, 0.0)
        s1 += d
        s2 += d * d
    n = tl.minimum(HW - start, CHUNK).to(ACC)
    t1 = tl.sum(s1, axis=0)
    t2 = tl.sum(s2, axis=0)
    out = plane.to(tl.int64) * S + chunk
    tl.store(shift_ptr + out, shift)
    tl.store(dmean_ptr + out, t1 / n)
    tl.store(m2_ptr + out, t2 - t1 * (t1 / n))


@triton.jit
def _gate_inh_kernel(
    h_ptr, u_ptr, b_ptr, hg_ptr, g1_ptr, s1_ptr, C, HW,
    LIN: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    """hg = h * g1, g1 = sigma(U1 h + b1); with LIN also g1 and h * sigma'(U1 h + b1)."""
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * CHUNK
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    base = b * C * HW
    rows = base + ch.to(tl.int64)[:, None] * HW
    bias = _load(b_ptr, ch, cmask, ACC)[:, None]
    for i in range(0, CHUNK, BLOCK_P):
        p = start + i + tl.arange(0, BLOCK_P)
        pmask = p < HW
        offs = rows + p[None, :]
        mask = cmask[:, None] & pmask[None, :]
        h = _load(h_ptr, offs, mask, ACC)
        pre = _channel_mix(u_ptr, h_ptr, h_ptr, base, p, pmask, C, HW, False, False, BLOCK_C, BLOCK_P, ACC)
        g1, slope = _sigmoid_slope(pre + bias)
        tl.store(hg_ptr + offs, (h * g1).to(hg_ptr.dtype.element_ty), mask=mask)
        if LIN:
            tl.store(g1_ptr + offs, g1.to(g1_ptr.dtype.element_ty), mask=mask)
            tl.store(s1_ptr + offs, (h * slope).to(s1_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inhibit_kernel(
    c_ptr, x_ptr, h_ptr, nm_ptr, ns_ptr, nw_ptr, nb_ptr, alpha_ptr, mu_ptr,
    h1_ptr, q1_ptr, q2_ptr, xhat_ptr, C, HW,
    NORM: tl.constexpr, LIN: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """h1 = sp(x - sp(c1 * (alpha h + mu))), c1 = nw * xhat + nb, xhat = (c_raw - nm) * ns.

    With LIN also dq = -sigma(x - sp(q)) sigma(q), q1 = dq * (alpha h + mu), q2 = dq * c1 * alpha
    and xhat (when NORM).
    """
    plane = tl.program_id(0)
    c = plane % C
    base = plane.to(tl.int64) * HW
    start = tl.program_id(1) * CHUNK
    alpha = tl.load(alpha_ptr + c).to(ACC)
    mu = tl.load(mu_ptr + c).to(ACC)
    if NORM:
        nm = tl.load(nm_ptr + plane).to(ACC)
        ns = tl.load(ns_ptr + plane).to(ACC)
        nw = tl.load(nw_ptr + c).to(ACC)
        nb = tl.load(nb_ptr + c).to(ACC)
    for i in range(0, CHUNK, BLOCK):
        p = start + i + tl.arange(0, BLOCK)
        mask = p < HW
        offs = base + p
        c1 = _load(c_ptr, offs, mask, ACC)
        if NORM:
            xhat = (c1 - nm) * ns
            c1 = xhat * nw + nb
        h = _load(h_ptr, offs, mask, ACC)
        x = _load(x_ptr, offs, mask, ACC)
        a = alpha * h + mu
        q = c1 * a
        sp_q, sig_q = _softplus_sigmoid(q)
        h1, sig_r = _softplus_sigmoid(x - sp_q)
        tl.store(h1_ptr + offs, h1.to(h1_ptr.dtype.element_ty), mask=mask)
        if LIN:
            dq = -sig_r * sig_q
            tl.store(q1_ptr + offs, (dq * a).to(q1_ptr.dtype.element_ty), mask=mask)
            tl.store(q2_ptr + offs, (dq * c1 * alpha).to(q2_ptr.dtype.element_ty), mask=mask)
            if NORM:
                tl.store(xhat_ptr + offs, xhat.to(xhat_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _excite_mix_kernel(
    c_ptr, h_ptr, h1_ptr, nm_ptr, ns_ptr, nw_ptr, nb_ptr, u_ptr, b_ptr,
    kappa_ptr, gamma_ptr, omega_ptr,
    out_ptr, p1_ptr, p2_ptr, p3_ptr, p4_ptr, xhat_ptr, C, HW,
    NORM: tl.constexpr, LIN: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """F = sp(h + g2 (hh - h)), hh = sp(kappa h1 + gamma c2 + omega h1 c2), g2 = sigma(U2 h1 + b2).

    With LIN also the VJP factors (s_z = sigma(z), s_e = sigma(e), de = s_z g2 s_e):
    p1 = de (gamma + omega h1), p2 = de (kappa + omega c2), p3 = s_z (hh - h) sigma'(U2 h1 + b2),
    p4 = s_z (1 - g2), and xhat (when NORM).
    """
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * CHUNK
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    base = b * C * HW
    rows = base + ch.to(tl.int64)[:, None] * HW
    bias = _load(b_ptr, ch, cmask, ACC)[:, None]
    kappa = _load(kappa_ptr, ch, cmask, ACC)[:, None]
    gamma = _load(gamma_ptr, ch, cmask, ACC)[:, None]
    omega = _load(omega_ptr, ch, cmask, ACC)[:, None]
    if NORM:
        nm = _load(nm_ptr, b * C + ch, cmask, ACC)[:, None]
        ns = _load(ns_ptr, b * C + ch, cmask, ACC)[:, None]
        nw = _load(nw_ptr, ch, cmask, ACC)[:, None]
        nb = _load(nb_ptr, ch, cmask, ACC)[:, None]
    for i in range(0, CHUNK, BLOCK_P):
        p = start + i + tl.arange(0, BLOCK_P)
        pmask = p < HW
        offs = rows + p[None, :]
        mask = cmask[:, None] & pmask[None, :]
        c2 = _load(c_ptr, offs, mask, ACC)
        if NORM:
            xhat = (c2 - nm) * ns
            c2 = xhat * nw + nb
        h = _load(h_ptr, offs, mask, ACC)
        h1 = _load(h1_ptr, offs, mask, ACC)
        pre = _channel_mix(u_ptr, h1_ptr, h1_ptr, base, p, pmask, C, HW, False, False, BLOCK_C, BLOCK_P, ACC)
        g2, g2_slope = _sigmoid_slope(pre + bias)
        hh, s_e = _softplus_sigmoid(kappa * h1 + gamma * c2 + omega * h1 * c2)
        f, s_z = _softplus_sigmoid(h + g2 * (hh - h))
        tl.store(out_ptr + offs, f.to(out_ptr.dtype.element_ty), mask=mask)
        if LIN:
            de = s_z * g2 * s_e
            tl.store(p1_ptr + offs, (de * (gamma + omega * h1)).to(p1_ptr.dtype.element_ty), mask=mask)
            tl.store(p2_ptr + offs, (de * (kappa + omega * c2)).to(p2_ptr.dtype.element_ty), mask=mask)
            tl.store(p3_ptr + offs, (s_z * (hh - h) * g2_slope).to(p3_ptr.dtype.element_ty), mask=mask)
            tl.store(p4_ptr + offs, (s_z * (1.0 - g2)).to(p4_ptr.dtype.element_ty), mask=mask)
            if NORM:
                tl.store(xhat_ptr + offs, xhat.to(xhat_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# VJP passes


@triton.jit
def _vjp_excite_mix_kernel(
    v_ptr, p1_ptr, p2_ptr, p3_ptr, xhat_ptr, u_ptr, dc_ptr, dh1_ptr, sum_ptr, sumx_ptr, C, HW, S,
    NORM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    """dc2 = v p1 and dh1 = v p2 + U2^T (v p3); with NORM, partial sums of dc2 and dc2 xhat2."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    base = b * C * HW
    rows = base + ch.to(tl.int64)[:, None] * HW
    acc1 = tl.zeros([BLOCK_C], dtype=ACC)
    acc2 = tl.zeros([BLOCK_C], dtype=ACC)
    for i in range(0, CHUNK, BLOCK_P):
        p = start + i + tl.arange(0, BLOCK_P)
        pmask = p < HW
        offs = rows + p[None, :]
        mask = cmask[:, None] & pmask[None, :]
        v = _load(v_ptr, offs, mask, ACC)
        dc = v * _load(p1_ptr, offs, mask, ACC)
        gate = _channel_mix(u_ptr, v_ptr, p3_ptr, base, p, pmask, C, HW, True, True, BLOCK_C, BLOCK_P, ACC)
        dh1 = v * _load(p2_ptr, offs, mask, ACC) + gate
        tl.store(dc_ptr + offs, dc.to(dc_ptr.dtype.element_ty), mask=mask)
        tl.store(dh1_ptr + offs, dh1.to(dh1_ptr.dtype.element_ty), mask=mask)
        if NORM:
            xhat = _load(xhat_ptr, offs, mask, ACC)
            acc1 += tl.sum(dc, axis=1)
            acc2 += tl.sum(dc * xhat, axis=1)
    if NORM:
        out = (b * C + ch) * S + chunk
        tl.store(sum_ptr + out, acc1, mask=cmask)
        tl.store(sumx_ptr + out, acc2, mask=cmask)


@triton.jit
def _norm_vjp_kernel(
    dy_ptr, xhat_ptr, ka_ptr, kb_ptr, kc_ptr, out_ptr, HW,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """N^T(dy) = ka dy + kb + kc xhat with per-(b, c) coefficients from the plane sums."""
    plane = tl.program_id(0)
    base = plane.to(tl.int64) * HW
    start = tl.program_id(1) * CHUNK
    ka = tl.load(ka_ptr + plane).to(ACC)
    kb = tl.load(kb_ptr + plane).to(ACC)
    kc = tl.load(kc_ptr + plane).to(ACC)
    for i in range(0, CHUNK, BLOCK):
        p = start + i + tl.arange(0, BLOCK)
        mask = p < HW
        offs = base + p
        dy = _load(dy_ptr, offs, mask, ACC)
        xhat = _load(xhat_ptr, offs, mask, ACC)
        tl.store(out_ptr + offs, (ka * dy + kb + kc * xhat).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _vjp_inhibit_kernel(
    dh1_ptr, t_ptr, q1_ptr, q2_ptr, v_ptr, p4_ptr, xhat_ptr, dc_ptr, dh_ptr, sum_ptr, sumx_ptr,
    HW, S,
    NORM: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """With dh1 = dh1_partial + W_exc^T (*) dr2: dc1 = dh1 q1 and dh = dh1 q2 + v p4; with NORM,
    partial sums of dc1 and dc1 xhat1."""
    plane = tl.program_id(0)
    chunk = tl.program_id(1)
    base = plane.to(tl.int64) * HW
    start = chunk * CHUNK
    acc1 = tl.zeros([BLOCK], dtype=ACC)
    acc2 = tl.zeros([BLOCK], dtype=ACC)
    for i in range(0, CHUNK, BLOCK):
        p = start + i + tl.arange(0, BLOCK)
        mask = p < HW
        offs = base + p
        dh1 = _load(dh1_ptr, offs, mask, ACC) + _load(t_ptr, offs, mask, ACC)
        dc = dh1 * _load(q1_ptr, offs, mask, ACC)
        v = _load(v_ptr, offs, mask, ACC)
        dh = dh1 * _load(q2_ptr, offs, mask, ACC) + v * _load(p4_ptr, offs, mask, ACC)
        tl.store(dc_ptr + offs, dc.to(dc_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
        if NORM:
            xhat = _load(xhat_ptr, offs, mask, ACC)
            acc1 += dc
            acc2 += dc * xhat
    if NORM:
        out = plane.to(tl.int64) * S + chunk
        tl.store(sum_ptr + out, tl.sum(acc1, axis=0))
        tl.store(sumx_ptr + out, tl.sum(acc2, axis=0))


@triton.jit
def _vjp_gate_inh_kernel(
    t_ptr, dh_ptr, g1_ptr, s1_ptr, u_ptr, out_ptr, C, HW,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """J^T v = dh + dhg g1 + U1^T (dhg h sigma'(U1 h + b1)), dhg = W_inh^T (*) dr1."""
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * CHUNK
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    base = b * C * HW
    rows = base + ch.to(tl.int64)[:, None] * HW
    for i in range(0, CHUNK, BLOCK_P):
        p = start + i + tl.arange(0, BLOCK_P)
        pmask = p < HW
        offs = rows + p[None, :]
        mask = cmask[:, None] & pmask[None, :]
        t = _load(t_ptr, offs, mask, ACC)
        gate = _channel_mix(u_ptr, t_ptr, s1_ptr, base, p, pmask, C, HW, True, True, BLOCK_C, BLOCK_P, ACC)
        out = _load(dh_ptr, offs, mask, ACC) + t * _load(g1_ptr, offs, mask, ACC) + gate
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configurations

if INTERPRETED:
    # The interpreter pays per program and per operation, so few large programs; the tests'
    # 13 x 11 planes still take two blocks per chunk (the second ragged), and their 20 x 17
    # planes two chunks per plane and per sample.
    PLANE_CHUNK, TILE_CHUNK = 256, 256
    _PLANE_CONFIGS = [triton.Config({"BLOCK": 128}, num_warps=4)]
    _TILE_CONFIGS = [triton.Config({"BLOCK_P": 128}, num_warps=4)]
else:
    PLANE_CHUNK, TILE_CHUNK = 4096, 512
    _PLANE_CONFIGS = [
        triton.Config({"BLOCK": 512}, num_warps=4),
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=8),
    ]
    # Tile kernels keep ~15 tiles live. Compiled for sm_90 by triton 3.9 with BLOCK_C = 32,
    # 4 elements per thread and tile (32 / 8 warps, 64 / 16 warps) take 48-128 registers and no
    # real spills; 8 per thread (32 / 4 warps) 80-255 and spills in excite_mix.
    _TILE_CONFIGS = [
        triton.Config({"BLOCK_P": 32}, num_warps=4),
        triton.Config({"BLOCK_P": 32}, num_warps=8),
        triton.Config({"BLOCK_P": 64}, num_warps=16),
    ]


if os.environ.get("CRBP_FAST_TRITON_ONE_CONFIG") == "1":
    # One config per kernel shape, no autotuning: a quick GPU check (each autotuned variant
    # compiles every config) and reproducible launches.
    _PLANE_CONFIGS, _TILE_CONFIGS = _PLANE_CONFIGS[:1], _TILE_CONFIGS[:1]

#: The constexpr switches that select a different compiled variant of a kernel: the autotuner
#: must tune each variant on its own (the norm's extra loads and the factor stores change the
#: best block size), so they are part of its key wherever a kernel has them.
VARIANT_FLAGS = ("NORM", "LIN")


def _autotuned(kernel, configs, key):
    names = inspect.signature(kernel.fn).parameters
    return triton.autotune(configs=configs, key=[*key, *(f for f in VARIANT_FLAGS if f in names)])(kernel)


def _plane(kernel):
    return _autotuned(kernel, _PLANE_CONFIGS, ["HW"])


def _tile(kernel):
    return _autotuned(kernel, _TILE_CONFIGS, ["C", "HW"])


moments = _plane(_moments_kernel)
gate_inh = _tile(_gate_inh_kernel)
inhibit = _plane(_inhibit_kernel)
excite_mix = _tile(_excite_mix_kernel)
vjp_excite_mix = _tile(_vjp_excite_mix_kernel)
norm_vjp = _plane(_norm_vjp_kernel)
vjp_inhibit = _plane(_vjp_inhibit_kernel)
vjp_gate_inh = _tile(_vjp_gate_inh_kernel)


# --------------------------------------------------------------------------------------------
# The FFT conv's channel mix and spectrum gradient (crbp_fast/conv/fft.py: spectral_mix,
# spectral_outer), on real views of the complex spectra. One program per (tile of MIX_LANES
# frequencies, output channel, sample) resp. (tile, (o, c) pair); no autotuning (the tile is
# the spectrum layout's).

#: Frequencies per tile: fft_conv.MIX_LANES and csrc/hgru.h kSpectralMixLanes.
MIX_LANES = 32


@triton.jit
def _spectral_mix_kernel(z, spec, out, X, Y, P, CONJ: tl.constexpr, L: tl.constexpr, ACC: tl.constexpr):
    tile = tl.program_id(0)
    y = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    lanes = tl.arange(0, L)
    p = tile.to(tl.int64) * L + lanes
    mask = p < P
    ar = tl.zeros([L], dtype=ACC)
    ai = tl.zeros([L], dtype=ACC)
    block = tile.to(tl.int64) * X * Y * 2 * L
    for x in range(0, X):
        if CONJ:  # K[x, y]: spec blocks (O = X, C = Y)
            k = spec + block + (x * Y + y).to(tl.int64) * 2 * L + lanes
        else:  # K[y, x]: (O = Y, C = X)
            k = spec + block + (y * X + x).to(tl.int64) * 2 * L + lanes
        kr = tl.load(k).to(ACC)
        ki = tl.load(k + L).to(ACC)
        zp = z + ((b * X + x) * P + p) * 2
        zr = tl.load(zp, mask=mask, other=0.0).to(ACC)
        zi = tl.load(zp + 1, mask=mask, other=0.0).to(ACC)
        if CONJ:
            ar += kr * zr + ki * zi
            ai += kr * zi - ki * zr
        else:
            ar += kr * zr - ki * zi
            ai += kr * zi + ki * zr
    op = out + ((b * Y + y) * P + p) * 2
    tl.store(op, ar.to(out.dtype.element_ty), mask=mask)
    tl.store(op + 1, ai.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _spectral_outer_kernel(pp, qq, d, B, O, C, P, ROWS, L: tl.constexpr, ACC: tl.constexpr):
    tile = tl.program_id(0)
    pair = tl.program_id(1)
    o = pair // C
    c = pair % C
    lanes = tl.arange(0, L)
    f = tile.to(tl.int64) * L + lanes
    mask = f < P
    ar = tl.zeros([L], dtype=ACC)
    ai = tl.zeros([L], dtype=ACC)
    for b in range(0, B):
        pa = pp + ((b * O + o).to(tl.int64) * P + f) * 2
        qa = qq + ((b * C + c).to(tl.int64) * P + f) * 2
        pr = tl.load(pa, mask=mask, other=0.0).to(ACC)
        pi = tl.load(pa + 1, mask=mask, other=0.0).to(ACC)
        qr = tl.load(qa, mask=mask, other=0.0).to(ACC)
        qi = tl.load(qa + 1, mask=mask, other=0.0).to(ACC)
        ar += pr * qr + pi * qi
        ai += pi * qr - pr * qi
    cols = P // ROWS
    row = ((f % cols) * ROWS + f // cols) * 2 * C * O
    tl.store(d + row + c * O + o, ar.to(d.dtype.element_ty), mask=mask)
    tl.store(d + row + (C + c) * O + o, ai.to(d.dtype.element_ty), mask=mask)


spectral_mix = _spectral_mix_kernel
spectral_outer = _spectral_outer_kernel
