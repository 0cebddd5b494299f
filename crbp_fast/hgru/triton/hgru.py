"""The hGRU step and its VJP as fused Triton passes: ``HGRUCell(backend="triton")``.

The passes carry the names of :mod:`crbp_fast.hgru.reference` (where the math is written out)
and compute the same values; where the fused data flow saves a pass over memory they differ:

- :func:`inhibit` returns h1 only: the mix gate g2 = sigma(U2 h1 + b2) is computed inside
  :func:`excite_mix` from the h1 tile it reads anyway (no write and re-read of g2);
- normalisation is not a pass of its own: :func:`norm_stats` reads the conv output once for
  per-(b, c) partial moments, tiny (B, C) torch ops combine them over the batch ("batch") or the
  group's channels ("group"), and the affine is applied inside :func:`inhibit` /
  :func:`excite_mix`;
- in the VJP the sums that ``N^T`` needs (of dc and dc * xhat) are reduced inside
  :func:`vjp_excite_mix` / :func:`vjp_inhibit`, so :func:`norm_vjp` is a single apply pass;
- :class:`Factors` stores products of the reference's factors (ten tensors, eight for norm
  "none", instead of fourteen).

Memory traffic in full (B, C, H, W) tensors read or written, convolutions aside (norm "none" in
brackets): a step 12 (10) -- gate_inh 2, norm_stats 1, inhibit 4, norm_stats 1, excite_mix 4;
linearize 22 (18); a VJP 27 (19) -- vjp_excite_mix 7, norm_vjp 3, vjp_inhibit 9, norm_vjp 3,
vjp_gate_inh 5.

Dtypes: float32 and float64 everywhere (float64 accumulates in float64); on CUDA also bfloat16
and float16 storage with float32 accumulation, either from bfloat16/float16 inputs or from
float32 inputs under ``torch.autocast("cuda")`` (then the intermediates, the conv inputs and the
VJP factors are stored in the autocast dtype, and the state keeps the input's dtype).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from ..backends import Backend, ConvEngineLike, PassLinearization, register_backend
from ..reference import ConvFn, HGRUParams, NormSpec
from . import kernels, ops

log = logging.getLogger("crbp_fast")

#: Widest cell the fused passes take: the passes with a 1x1 gate hold tiles of every channel
#: in registers. Wider cells run the reference passes (with a warning).
MAX_CHANNELS = 64

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_warned_wide: set[int] = set()


def storage_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the intermediates for input x: the CUDA autocast dtype for float32 inputs
    under autocast, else x's dtype (which must be one the backend supports on x's device)."""
    allowed = _CUDA_DTYPES if x.is_cuda else _CPU_DTYPES
    if x.dtype not in allowed:
        raise TypeError(
            f"x: backend 'triton' on {x.device.type} supports dtypes {[str(d) for d in allowed]}, got {x.dtype}"
        )
    if x.is_cuda and x.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def _as(weight: Tensor, dtype: torch.dtype) -> Tensor:
    return weight if weight.dtype == dtype else weight.to(dtype)


# --------------------------------------------------------------------------------------------
# Normalisation


def _reduction_sets(t: Tensor, spec: NormSpec) -> Tensor:
    """(B, C, S) per-plane partials -> (sets..., members): one row per reduction set."""
    b, c, s = t.shape
    if spec.kind == "batch":
        return t.transpose(0, 1).reshape(c, b * s)
    return t.reshape(b, spec.groups, (c // spec.groups) * s)


def _per_plane(t: Tensor, spec: NormSpec, b: int, c: int) -> Tensor:
    """A per-set statistic (sets..., 1) from :func:`_reduction_sets` -> (B, C)."""
    if spec.kind == "batch":
        return t.reshape(1, c).expand(b, c)
    return t.expand(b, spec.groups, c // spec.groups).reshape(b, c)


def norm_stats(c_raw: Tensor, spec: NormSpec) -> tuple[Tensor, Tensor]:
    """Mean and inverse standard deviation (biased variance) of each (b, c)'s reduction set,
    each (B, C) in the accumulation dtype.

    The chunks' moments merge by Chan's rule around the set's first shift, so no step rounds
    at the magnitude of the mean.
    """
    if spec.kind == "none":
        raise ValueError(f"norm_stats: no statistics for norm kind {spec.kind!r}")
    b, c, hgt, wid = c_raw.shape
    shift, dmean, m2 = ops.plane_moments(c_raw)
    count = ops.plane_chunk_counts(hgt * wid, c_raw.device).to(shift.dtype).expand_as(shift)
    shift, dmean, m2, count = (_reduction_sets(t, spec) for t in (shift, dmean, m2, count))
    origin = shift[..., :1]
    delta = (shift - origin) + dmean  # each chunk's mean, relative to the origin
    n = count.sum(-1, keepdim=True)
    mean = (count * delta).sum(-1, keepdim=True) / n
    var = (m2 + count * (delta - mean) ** 2).sum(-1, keepdim=True) / n
    invstd = torch.rsqrt(var.clamp_min(0) + spec.eps)
    return _per_plane(origin + mean, spec, b, c), _per_plane(invstd, spec, b, c)


class NormCoefs(NamedTuple):
    """What a forward pass needs to normalise: xhat = (c_raw - mean) * invstd (each (B, C)),
    then weight * xhat + bias (each (C,)); all None for norm "none"."""

    mean: Tensor | None
    invstd: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


def norm_coefs(c_raw: Tensor, spec: NormSpec) -> NormCoefs:
    """The normalisation arguments of :func:`ops.inhibit` / :func:`ops.excite_mix` for c_raw."""
    if spec.kind == "none":
        return NormCoefs(None, None, None, None)
    return NormCoefs(*norm_stats(c_raw, spec), spec.weight, spec.bias)


def _set_means(partials: Tensor, weight: Tensor, spec: NormSpec, hw: int) -> Tensor:
    """mean_S(w * y) per (b, c), (B, C), from the (B, C, S) partial sums of y."""
    b, c = partials.shape[:2]
    plane_sums = (partials.sum(-1) * weight).unsqueeze(-1)
    return _per_plane(_reduction_sets(plane_sums, spec).mean(-1, keepdim=True) / hw, spec, b, c)


def norm_vjp(
    dy: Tensor, xhat: Tensor | None, invstd: Tensor | None, sums: list[Tensor] | None, spec: NormSpec,
) -> Tensor:
    """N^T(dy) = invstd (w dy - mean_S(w dy) - xhat mean_S(w dy xhat)), statistics included.

    ``sums``: the (B, C, S) partials of dy and dy * xhat from the pass that produced dy (any
    float dtype);
    ``invstd`` (B, C). For norm "none", dy itself.
    """
    if spec.kind == "none":
        return dy
    hw = dy.shape[2] * dy.shape[3]
    weight = spec.weight.reshape(-1).to(invstd.dtype)
    # The set means in the partials' dtype (float64 partials: float64 means), the coefficients in invstd's.
    m1, m2 = (_set_means(s, weight, spec, hw).to(invstd.dtype) for s in sums)
    return ops.norm_vjp(dy, xhat, invstd * weight, -invstd * m1, -invstd * m2)


# --------------------------------------------------------------------------------------------
# Forward passes


def gate_inh(h: Tensor, u1_weight: Tensor, u1_bias: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """hg = h * sigma(U1 h + b1), stored in ``dtype`` (default: h's)."""
    return ops.gate_inh(h, u1_weight, u1_bias, dtype or h.dtype, False)[0]


def inhibit(
    c1_raw: Tensor, x: Tensor, h: Tensor, norm: NormSpec, alpha: Tensor, mu: Tensor,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """h1 = sp(x - sp(N_inh(c1_raw) * (alpha h + mu))); the mix gate moves to :func:`excite_mix`."""
    return ops.inhibit(c1_raw, x, h, *norm_coefs(c1_raw, norm), alpha, mu, dtype or h.dtype, False)[0]


def excite_mix(
    c2_raw: Tensor, h: Tensor, h1: Tensor, norm: NormSpec, kappa: Tensor, gamma: Tensor, omega: Tensor,
    u2_weight: Tensor, u2_bias: Tensor, out_dtype: torch.dtype | None = None,
) -> Tensor:
    """F = sp((1 - g2) h + g2 sp(kappa h1 + gamma c2 + omega h1 c2)), c2 = N_exc(c2_raw), with
    g2 = sigma(U2 h1 + b2) computed here; F in ``out_dtype`` (default: h's)."""
    return ops.excite_mix(
        c2_raw, h, h1, *norm_coefs(c2_raw, norm), u2_weight, u2_bias, kappa, gamma, omega,
        out_dtype or h.dtype, h1.dtype, False,
    )[0]


def step(x: Tensor, h: Tensor, p: HGRUParams, conv: ConvFn = reference.conv_same) -> Tensor:
    """One hGRU step F(x, h) from the three fused passes and two convs (no autograd)."""
    dtype = storage_dtype(x)
    x, h = x.contiguous(), h.contiguous()
    hg = gate_inh(h, p.u1_weight, p.u1_bias, dtype)
    h1 = inhibit(conv(hg, _as(p.w_inh, dtype)), x, h, p.norm_inh, p.alpha, p.mu, dtype)
    return excite_mix(
        conv(h1, _as(p.w_exc, dtype)), h, h1, p.norm_exc, p.kappa, p.gamma, p.omega,
        p.u2_weight, p.u2_bias, x.dtype,
    )


# --------------------------------------------------------------------------------------------
# Linearisation and VJP passes


class Factors(NamedTuple):
    """Everything the fused VJP needs at a fixed (x, h), as products of the reference's factors.

    Each (B, C, H, W) in the storage dtype unless noted; s_z = sigma(z), s_e = sigma(e),
    dq = -sigma(x - sp(q)) sigma(q).
    """

    state: Tensor  # F(x, h), in x's dtype
    p1: Tensor  # s_z g2 s_e (gamma + omega h1):   dc2 = v p1
    p2: Tensor  # s_z g2 s_e (kappa + omega c2):   dh1 = v p2 + ...
    p3: Tensor  # s_z (hh - h) g2 (1 - g2):         ... + U2^T (v p3)
    p4: Tensor  # s_z (1 - g2):                     dh = v p4 + ...
    xhat2: Tensor | None  # normalised exc conv output (None for norm "none")
    invstd2: Tensor | None  # (B, C), accumulation dtype
    q1: Tensor  # dq (alpha h + mu):               dc1 = dh1 q1
    q2: Tensor  # dq c1 alpha:                     dh += dh1 q2
    xhat1: Tensor | None
    invstd1: Tensor | None
    g1: Tensor  # sigma(U1 h + b1):                dh += dhg g1 + ...
    s1: Tensor  # h g1 (1 - g1):                   ... + U1^T (dhg s1)


def linearize(x: Tensor, h: Tensor, p: HGRUParams, conv: ConvFn = reference.conv_same) -> Factors:
    """The forward step at (x, h) with every factor its VJP needs, computed once (no autograd)."""
    dtype = storage_dtype(x)
    x, h = x.contiguous(), h.contiguous()
    hg, g1, s1 = ops.gate_inh(h, p.u1_weight, p.u1_bias, dtype, True)
    c1_raw = conv(hg, _as(p.w_inh, dtype))
    coefs1 = norm_coefs(c1_raw, p.norm_inh)
    h1, q1, q2, *xhat1 = ops.inhibit(c1_raw, x, h, *coefs1, p.alpha, p.mu, dtype, True)
    c2_raw = conv(h1, _as(p.w_exc, dtype))
    coefs2 = norm_coefs(c2_raw, p.norm_exc)
    state, p1, p2, p3, p4, *xhat2 = ops.excite_mix(
        c2_raw, h, h1, *coefs2, p.u2_weight, p.u2_bias, p.kappa, p.gamma, p.omega, x.dtype, dtype, True,
    )
    return Factors(
        state=state, p1=p1, p2=p2, p3=p3, p4=p4, xhat2=xhat2[0] if xhat2 else None, invstd2=coefs2.invstd,
        q1=q1, q2=q2, xhat1=xhat1[0] if xhat1 else None, invstd1=coefs1.invstd, g1=g1, s1=s1,
    )


def vjp_excite_mix(v: Tensor, f: Factors, u2_weight: Tensor) -> tuple[Tensor, Tensor, list[Tensor] | None]:
    """From v = dL/dF: (dc2, dh1 without the exc-conv term, the norm partials or None)."""
    dc2, dh1, *sums = ops.vjp_excite_mix(v, f.p1, f.p2, f.p3, f.xhat2, u2_weight)
    return dc2, dh1, sums or None


def vjp_inhibit(dh1: Tensor, t2: Tensor, v: Tensor, f: Factors) -> tuple[Tensor, Tensor, list[Tensor] | None]:
    """From dh1 = ``dh1`` + ``t2`` (the exc-conv term): (dc1, dh so far, the norm partials or None)."""
    dc1, dh, *sums = ops.vjp_inhibit(dh1, t2, f.q1, f.q2, v, f.p4, f.xhat1)
    return dc1, dh, sums or None


def vjp_gate_inh(dhg: Tensor, dh: Tensor, f: Factors, u1_weight: Tensor, out_dtype: torch.dtype) -> Tensor:
    """From dhg = dL/d(h * g1): the final dh = J^T v, in ``out_dtype``."""
    return ops.vjp_gate_inh(dhg, dh, f.g1, f.s1, u1_weight, out_dtype)


def vjp(v: Tensor, f: Factors, p: HGRUParams, conv_t: ConvFn = reference.conv_same_transpose) -> Tensor:
    """J^T v at the point :func:`linearize` was taken (no autograd)."""
    if v.shape != f.state.shape:
        raise ValueError(f"v: expected the state's shape {tuple(f.state.shape)}, got {tuple(v.shape)}")
    dtype = f.p1.dtype
    v = v.contiguous()
    dc2, dh1, sums2 = vjp_excite_mix(v, f, p.u2_weight)
    t2 = conv_t(norm_vjp(dc2, f.xhat2, f.invstd2, sums2, p.norm_exc), _as(p.w_exc, dtype))
    dc1, dh, sums1 = vjp_inhibit(dh1, t2, v, f)
    dhg = conv_t(norm_vjp(dc1, f.xhat1, f.invstd1, sums1, p.norm_inh), _as(p.w_inh, dtype))
    return vjp_gate_inh(dhg, dh, f, p.u1_weight, v.dtype)


# --------------------------------------------------------------------------------------------
# The backend


# --------------------------------------------------------------------------------------------
# The FFT conv's channel mix (crbp_fast/conv/fft.py)


def _check_out(name: str, out: Tensor, shape: tuple, like: Tensor, inputs: tuple) -> None:
    """An output buffer: ``shape`` in ``like``'s dtype and device, contiguous, sharing no memory
    with ``inputs``."""
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name}: expected a {like.dtype} {tuple(shape)} tensor on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {out.stride()}")
    lo = out.data_ptr()
    hi = lo + out.numel() * out.element_size()
    for t in inputs:
        t_lo = t.data_ptr()
        if t_lo < hi and lo < t_lo + t.numel() * t.element_size():
            raise ValueError(f"{name}: must not overlap the inputs")


def _check_spectrum_view(name: str, t: Tensor) -> None:
    if t.dim() != 4 or t.shape[3] != 2 or t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: expected a float32/float64 (B, X, P, 2) real view of a complex spectrum, "
                         f"got {t.dtype} {tuple(t.shape)}")


def spectral_mix(z: Tensor, layout: Tensor, transpose: bool = False) -> Tensor:
    """:func:`crbp_fast.conv.fft.spectral_mix` on real views: z (B, X, P, 2), ``layout``
    (ceil(P / 32), O, C, 2, 32) from :func:`crbp_fast.conv.fft.mix_layout` -> (B, Y, P, 2)."""
    _check_spectrum_view("z", z)
    b, nx, planes, _ = z.shape
    tiles = triton_cdiv(planes, kernels.MIX_LANES)
    if layout.dim() != 5 or layout.shape[0] != tiles or layout.shape[3:] != (2, kernels.MIX_LANES) \
            or layout.dtype != z.dtype or layout.device != z.device:
        raise ValueError(f"layout: expected a {z.dtype} ({tiles}, O, C, 2, {kernels.MIX_LANES}) tensor on {z.device}, "
                         f"got {layout.dtype} {tuple(layout.shape)} on {layout.device}")
    want = layout.shape[1] if transpose else layout.shape[2]
    if nx != want:
        raise ValueError(f"z: expected {want} channels for transpose={transpose}, got {nx}")
    ny = layout.shape[2] if transpose else layout.shape[1]
    z, layout = z.contiguous(), layout.contiguous()
    out = torch.empty((b, ny, planes, 2), device=z.device, dtype=z.dtype)
    with ops._on(z):
        kernels.spectral_mix[(tiles, ny, b)](
            z, layout, out, nx, ny, planes, CONJ=bool(transpose), L=kernels.MIX_LANES, ACC=ops._tl_acc(z),
        )
    return out


def spectral_outer(p: Tensor, q: Tensor, rows: int, out: Tensor | None = None) -> Tensor:
    """:func:`crbp_fast.conv.fft.spectral_outer` on real views: p (B, O, P, 2), q (B, C, P, 2)
    of rfft2 outputs with ``rows`` = M -> S (P, 2C, O) of sum_b p[b, o] conj(q[b, c]), written
    into ``out`` (contiguous, overlapping neither input) when given."""
    _check_spectrum_view("p", p)
    _check_spectrum_view("q", q)
    b, no, planes, _ = p.shape
    if q.shape[0] != b or q.shape[2] != planes or q.dtype != p.dtype or q.device != p.device:
        raise ValueError(f"q: expected the batch, frequencies, dtype and device of p {tuple(p.shape)}, got {tuple(q.shape)}")
    if rows < 1 or planes % rows:
        raise ValueError(f"rows: expected a positive divisor of P = {planes}, got {rows}")
    nc = q.shape[1]
    p, q = p.contiguous(), q.contiguous()
    if out is None:
        d = torch.empty((planes, 2 * nc, no), device=p.device, dtype=p.dtype)
    else:
        _check_out("out", out, (planes, 2 * nc, no), p, (p, q))
        d = out
        if not out.is_inference():  # written in place: a new version, as a torch op would give it
            torch.autograd.graph.increment_version(out)
    with ops._on(p):
        kernels.spectral_outer[(triton_cdiv(planes, kernels.MIX_LANES), no * nc)](
            p, q, d, b, no, nc, planes, rows, L=kernels.MIX_LANES, ACC=ops._tl_acc(p),
        )
    return d


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _too_wide(x: Tensor) -> bool:
    c = x.shape[1]
    if c <= MAX_CHANNELS:
        return False
    if c not in _warned_wide:
        _warned_wide.add(c)
        log.warning(
            "backend 'triton': %d channels exceed the fused kernels' limit of %d; running the reference passes",
            c, MAX_CHANNELS,
        )
    return True


def _tracked(p: HGRUParams, x: Tensor, h: Tensor) -> bool:
    """Whether autograd must record the step: grad mode on and x, h or a parameter needing grad."""
    if not torch.is_grad_enabled():
        return False
    specs = (p.norm_inh, p.norm_exc)
    tensors = [x, h, *(t for t in p if isinstance(t, Tensor)), *(s.weight for s in specs), *(s.bias for s in specs)]
    return any(t is not None and t.requires_grad for t in tensors)


def backend_step(p: HGRUParams, x: Tensor, h: Tensor, engine: ConvEngineLike) -> Tensor:
    """F(x, h): the fused passes when no gradient is needed, else the differentiable reference.

    The fused kernels have no autograd formula on purpose: the tracked step of rbp/crbp is one
    step of N (the other N - 1 run here without grad), and the LCP penalty differentiates
    through it twice (double backward), which the reference composition of torch ops gives.
    """
    if _tracked(p, x, h) or _too_wide(x):
        return reference.step(x, h, p, engine.conv)
    return step(x, h, p, engine.conv)


class TritonLinearization:
    """The step linearised at (x, h) by the fused passes: ``state`` = F(x, h), ``vjp(v)`` = J^T v.

    The factors are computed once here; each ``vjp`` is five fused passes (three for norm "none")
    and two ``engine.conv_transpose`` calls.
    """

    def __init__(self, params: HGRUParams, x: Tensor, h: Tensor, engine: ConvEngineLike):
        with torch.no_grad():
            dtype = storage_dtype(x)
            # Cast once: every vjp then passes the same weight tensors to the conv engine.
            self._params = params._replace(w_inh=_as(params.w_inh, dtype), w_exc=_as(params.w_exc, dtype))
            self._engine = engine
            self._factors = linearize(x, h, self._params, engine.conv)
        self.state = self._factors.state

    @classmethod
    def from_factors(cls, params: HGRUParams, factors: Factors, engine: ConvEngineLike) -> "TritonLinearization":
        """The linearisation whose factors are already computed (the tracked step's, converted by
        :func:`crbp_fast.hgru.triton.tracked.linearization`; float32 / float64, so no cast): no
        step, no conv."""
        self = cls.__new__(cls)
        self._params, self._engine, self._factors = params, engine, factors
        self.state = factors.state
        return self

    def vjp(self, v: Tensor) -> Tensor:
        with torch.no_grad():
            return vjp(v, self._factors, self._params, self._engine.conv_transpose)


def backend_linearize(p: HGRUParams, x: Tensor, h: Tensor, engine: ConvEngineLike):
    """:class:`TritonLinearization` at (x, h) (the reference passes for cells wider than
    :data:`MAX_CHANNELS`)."""
    if _too_wide(x):
        return PassLinearization(p, x, h, engine)
    return TritonLinearization(p, x.detach(), h.detach(), engine)


def unavailable_reason(device: torch.device) -> str:
    """Why the backend cannot run on ``device`` ("" when it can)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "" if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return (
                "on CPU the Triton kernels run only under triton's interpreter (TRITON_INTERPRET=1, "
                "slow, meant for tests); use backend='native' or 'torch' on CPU"
            )
        if not kernels.INTERPRETED:
            return "TRITON_INTERPRET=1 was set after crbp_fast.hgru.triton was imported; set it before the import"
        return ""
    return f"it runs on CUDA devices (and on CPU under TRITON_INTERPRET=1), not on {device.type!r}"


register_backend(Backend(
    name="triton", step=backend_step, linearize=backend_linearize,
    available=lambda device: unavailable_reason(device) == "", unavailable_reason=unavailable_reason,
))
