"""The hGRU step and its VJP as fused C++ / CUDA passes: ``HGRUCell(backend="native")``.

The passes carry the names and signatures of :mod:`crbp_fast.hgru.reference` (where the math is
written out) and compute the same values, with every elementwise operation, the 1x1 gates and
the normalisation of a pass fused into one kernel over memory:

- :func:`gate_inh`: h * sigma(U1 h + b1), the 1x1 conv done per pixel in-kernel;
- :func:`inhibit`: the statistics of the inhibitory conv output, then normalisation, inhibition
  and the mix gate g2 = sigma(U2 h1 + b2) in one pass over pixels;
- :func:`excite_mix`: the statistics of the excitatory conv output, then normalisation,
  excitation, the mix and the final softplus;
- :func:`linearize` runs the same three passes, also writing the factors of the VJP
  (:class:`Factors`, products of the reference's factors: ten tensors instead of fourteen);
- :func:`vjp` = :func:`vjp_excite_mix`, :func:`norm_vjp`, transposed conv, :func:`vjp_inhibit`
  (which also adds the conv's term to dh1), :func:`norm_vjp`, transposed conv,
  :func:`vjp_gate_inh`.

Memory traffic in full (B, C, H, W) maps read or written, convolutions aside (norm "none" in
brackets): a step 14 (12) -- gate_inh 2, inhibit 1 + 5, excite_mix 1 + 5 (the "1" reads the conv
output for its statistics); linearize 24 (20); a VJP 30 (20) -- vjp_excite_mix 8, norm_vjp 5,
vjp_inhibit 7, norm_vjp 5, vjp_gate_inh 5. The step and the VJP write over their own
temporaries (the ``out`` arguments of the extension) rather than allocating: a fresh 9 MB map
costs page faults comparable to the pass that fills it.

The convolutions stay outside, in the conv engine (direct or FFT). The kernels are not
differentiable: they are the untracked steps and the adjoint loop (the tracked step's own fused
passes, with their explicit backward, are :mod:`crbp_fast.hgru.native.tracked`). Dtypes: float32 and float64
on CPU (vectorised, AVX2 + FMA where the CPU has it, in parallel over ``torch.get_num_threads()``);
float32 and bfloat16 storage with float32 arithmetic on CUDA when the extension was built with
CUDA. Normalisation statistics are reduced in float64 on CPU.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from ..backends import Backend, ConvEngineLike, Linearization, PassLinearization, register_backend
from ..plane_tracked import bcast_stats as _bcast_stats
from ..plane_tracked import opmath as _opmath
from ..reference import ConvFn, HGRUParams, NormSpec, conv_same, conv_same_transpose

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository root (needs a C++ compiler, "
    "ninja and the installed torch; CRBP_FAST_NO_EXT must not be 1; CRBP_FAST_CUDA=1 adds the CUDA kernels)"
)

try:
    from . import _C
except ImportError as err:  # not built, or built against another torch
    raise ImportError(f"crbp_fast.hgru.native._C (the compiled extension) cannot be imported: {err}; {BUILD_HINT}") from err

log = logging.getLogger("crbp_fast")

_FUSED_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.bfloat16)}
_reference_logged: set[tuple[str, torch.dtype]] = set()


# --------------------------------------------------------------------------------------------
# Argument preparation: maps contiguous, parameters flat in the compute ("opmath") dtype


def _map(t: Tensor) -> Tensor:
    return t.detach().contiguous()


def _vec(p: Tensor, like: Tensor) -> Tensor:
    """A per-channel parameter, (C,) or (C, 1, 1), as a (C,) vector."""
    return p.detach().reshape(-1).to(device=like.device, dtype=_opmath(like)).contiguous()


def _mat(w: Tensor, like: Tensor) -> Tensor:
    """A 1x1 conv weight (C, C, 1, 1) as a (C, C) matrix."""
    return w.detach().reshape(w.shape[0], w.shape[1]).to(device=like.device, dtype=_opmath(like)).contiguous()


def _norm_args(spec: NormSpec, like: Tensor) -> tuple:
    """(kind, weight, bias, eps, groups), the flat form of a NormSpec that the extension takes."""
    if spec.kind == "none":
        return ("none", None, None, spec.eps, 1)
    return (spec.kind, _vec(spec.weight, like), _vec(spec.bias, like), spec.eps, spec.groups)


class _Prepared(NamedTuple):
    """HGRUParams converted once per step / linearisation."""

    u1_weight: Tensor
    u1_bias: Tensor
    u2_weight: Tensor
    u2_bias: Tensor
    alpha: Tensor
    mu: Tensor
    kappa: Tensor
    gamma: Tensor
    omega: Tensor
    norm_inh: tuple
    norm_exc: tuple


def _prepare(p: HGRUParams, like: Tensor) -> _Prepared:
    return _Prepared(
        _mat(p.u1_weight, like), _vec(p.u1_bias, like), _mat(p.u2_weight, like), _vec(p.u2_bias, like),
        _vec(p.alpha, like), _vec(p.mu, like), _vec(p.kappa, like), _vec(p.gamma, like), _vec(p.omega, like),
        _norm_args(p.norm_inh, like), _norm_args(p.norm_exc, like),
    )


# --------------------------------------------------------------------------------------------
# Normalisation


def norm_stats(c: Tensor, spec: NormSpec) -> tuple[Tensor, Tensor]:
    """Mean and inverse standard deviation over the reduction set, shaped as the reference's.

    Returned in the compute dtype (float32 for float32 / bfloat16 maps).
    """
    mean, invstd = _C.norm_stats(_map(c), spec.kind, spec.groups, spec.eps)
    return _bcast_stats(mean, spec), _bcast_stats(invstd, spec)


def normalize(c: Tensor, spec: NormSpec) -> Tensor:
    """N(c) = weight * (c - mean_S) * invstd_S + bias, or c for kind "none"."""
    if spec.kind == "none":
        return c
    c = _map(c)
    return _C.normalize(c, *_norm_args(spec, c))


def norm_vjp(dy: Tensor, xhat: Tensor | None, invstd: Tensor | None, spec: NormSpec) -> Tensor:
    """N^T(dy), statistics included; ``invstd`` is (B, C) or broadcastable to (B, C, 1, 1)."""
    if spec.kind == "none":
        return dy
    dy = _map(dy)
    b, ch = dy.shape[:2]
    invstd = invstd.detach().reshape(-1, ch).expand(b, ch).to(_opmath(dy)).contiguous()
    kind, weight, _, _, groups = _norm_args(spec, dy)
    return _C.norm_vjp(dy, _map(xhat), invstd, kind, weight, groups)


# --------------------------------------------------------------------------------------------
# Forward passes


def gate_inh(h: Tensor, u1_weight: Tensor, u1_bias: Tensor) -> Tensor:
    """hg = h * sigma(U1 h + b1): the input of the inhibitory conv."""
    h = _map(h)
    return _C.gate_inh(h, _mat(u1_weight, h), _vec(u1_bias, h))


def inhibit(
    c1_raw: Tensor, x: Tensor, h: Tensor, norm: NormSpec, alpha: Tensor, mu: Tensor,
    u2_weight: Tensor, u2_bias: Tensor,
) -> tuple[Tensor, Tensor]:
    """h1 = sp(x - sp(N_inh(c1_raw) * (alpha h + mu))) and the mix gate g2 = sigma(U2 h1 + b2)."""
    x = _map(x)
    return _C.inhibit(
        _map(c1_raw), x, _map(h), *_norm_args(norm, x), _vec(alpha, x), _vec(mu, x),
        _mat(u2_weight, x), _vec(u2_bias, x),
    )


def excite_mix(
    c2_raw: Tensor, h: Tensor, h1: Tensor, g2: Tensor, norm: NormSpec, kappa: Tensor,
    gamma: Tensor, omega: Tensor,
) -> Tensor:
    """F = sp((1 - g2) h + g2 sp(kappa h1 + gamma c2 + omega h1 c2)), c2 = N_exc(c2_raw)."""
    h = _map(h)
    return _C.excite_mix(
        _map(c2_raw), h, _map(h1), _map(g2), *_norm_args(norm, h), _vec(kappa, h), _vec(gamma, h),
        _vec(omega, h),
    )


def _step(x: Tensor, h: Tensor, pp: _Prepared, p: HGRUParams, conv: ConvFn) -> Tensor:
    # The conv outputs are this step's own buffers: inhibit writes h1 over c1 and g2 over hg
    # (dead once convolved), excite_mix writes F over c2, so a step allocates no map of its own
    # beyond hg.
    hg = _C.gate_inh(h, pp.u1_weight, pp.u1_bias)
    c1 = conv(hg, p.w_inh).contiguous()
    h1, g2 = _C.inhibit(
        c1, x, h, *pp.norm_inh, pp.alpha, pp.mu, pp.u2_weight, pp.u2_bias, h1_out=c1, g2_out=hg,
    )
    c2 = conv(h1, p.w_exc).contiguous()
    return _C.excite_mix(c2, h, h1, g2, *pp.norm_exc, pp.kappa, pp.gamma, pp.omega, out=c2)


def step(x: Tensor, h: Tensor, p: HGRUParams, conv: ConvFn = conv_same) -> Tensor:
    """One hGRU step F(x, h) from the three fused passes and two convs (not differentiable)."""
    x, h = _map(x), _map(h)
    with torch.no_grad():
        return _step(x, h, _prepare(p, x), p, conv)


# --------------------------------------------------------------------------------------------
# Linearisation and VJP passes


class Factors(NamedTuple):
    """Everything the native VJP needs at a fixed (x, h); each (B, C, H, W) unless noted.

    Products of :class:`crbp_fast.hgru.reference.Factors`, named ``a_to_b``: the gradient of b
    per unit gradient of a (m1 = U1 h + b1 and m2 = U2 h1 + b2 are the gates' pre-activations).
    """

    state: Tensor  # F(x, h)
    g1: Tensor
    dhg_to_dm1: Tensor  # h * g1 * (1 - g1)
    xhat1: Tensor | None  # normalised inh conv output (None for norm "none")
    invstd1: Tensor | None  # (B, C)
    dh1_to_dc1: Tensor  # -sigma(x - sp(q)) * sigma(q) * (alpha * h + mu)
    dh1_to_dh: Tensor  # -sigma(x - sp(q)) * sigma(q) * c1 * alpha
    xhat2: Tensor | None
    invstd2: Tensor | None
    v_to_dc2: Tensor  # sigma(z) * g2 * sigma(e) * (gamma + omega * h1)
    v_to_dh1: Tensor  # sigma(z) * g2 * sigma(e) * (kappa + omega * c2)
    v_to_dm2: Tensor  # sigma(z) * (hh - h) * g2 * (1 - g2)
    v_to_dh: Tensor  # sigma(z) * (1 - g2)


def _linearize(x: Tensor, h: Tensor, pp: _Prepared, p: HGRUParams, conv: ConvFn) -> Factors:
    hg, g1, dhg_to_dm1 = _C.linearize_gate_inh(h, pp.u1_weight, pp.u1_bias)
    h1, g2, xhat1, invstd1, dh1_to_dc1, dh1_to_dh = _C.linearize_inhibit(
        conv(hg, p.w_inh).contiguous(), x, h, *pp.norm_inh, pp.alpha, pp.mu, pp.u2_weight, pp.u2_bias,
    )
    state, xhat2, invstd2, v_to_dc2, v_to_dh1, v_to_dm2, v_to_dh = _C.linearize_excite_mix(
        conv(h1, p.w_exc).contiguous(), h, h1, g2, *pp.norm_exc, pp.kappa, pp.gamma, pp.omega,
    )
    return Factors(
        state=state, g1=g1, dhg_to_dm1=dhg_to_dm1, xhat1=xhat1, invstd1=invstd1, dh1_to_dc1=dh1_to_dc1,
        dh1_to_dh=dh1_to_dh, xhat2=xhat2, invstd2=invstd2, v_to_dc2=v_to_dc2, v_to_dh1=v_to_dh1,
        v_to_dm2=v_to_dm2, v_to_dh=v_to_dh,
    )


def linearize(x: Tensor, h: Tensor, p: HGRUParams, conv: ConvFn = conv_same) -> Factors:
    """The forward step at (x, h) with every factor its VJP needs, computed once."""
    x, h = _map(x), _map(h)
    with torch.no_grad():
        return _linearize(x, h, _prepare(p, x), p, conv)


def vjp_excite_mix(v: Tensor, f: Factors, u2_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From v = dL/dF: (dc2, dh1 without the exc-conv term, dh so far)."""
    v = _map(v)
    return _C.vjp_excite_mix(v, f.v_to_dc2, f.v_to_dh1, f.v_to_dm2, f.v_to_dh, _mat(u2_weight, v))


def vjp_inhibit(dh1: Tensor, dh: Tensor, f: Factors, dh1_extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """From dh1 (+ ``dh1_extra``, the exc-conv term, added in-kernel): (dc1, dh with the inhibition term)."""
    extra = None if dh1_extra is None else _map(dh1_extra)
    return _C.vjp_inhibit(_map(dh1), extra, _map(dh), f.dh1_to_dc1, f.dh1_to_dh)


def vjp_gate_inh(dhg: Tensor, dh: Tensor, f: Factors, u1_weight: Tensor) -> Tensor:
    """From dhg = dL/d(h * g1): the final dh."""
    dhg = _map(dhg)
    return _C.vjp_gate_inh(dhg, _map(dh), f.g1, f.dhg_to_dm1, _mat(u1_weight, dhg))


def _vjp(
    v: Tensor, f: Factors, pp: _Prepared, p: HGRUParams, conv_t: ConvFn,
    workspace: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    # Allocates dh, the result, and dc2 and dh1 unless a workspace holds them (a linearisation's,
    # reused by its every VJP: they never leave this function). Every later pass writes over a
    # buffer it has just read (the norm VJPs over their input, vjp_inhibit over dh1 and dh,
    # vjp_gate_inh over dh).
    kind2, weight2, _, _, groups2 = pp.norm_exc
    kind1, weight1, _, _, groups1 = pp.norm_inh
    dc2_out, dh1_out = workspace or (None, None)
    dc2, dh1, dh = _C.vjp_excite_mix(
        v, f.v_to_dc2, f.v_to_dh1, f.v_to_dm2, f.v_to_dh, pp.u2_weight, dc2_out=dc2_out, dh1_out=dh1_out,
    )
    dr2 = _C.norm_vjp(dc2, f.xhat2, f.invstd2, kind2, weight2, groups2, out=dc2)
    dc1, dh = _C.vjp_inhibit(
        dh1, conv_t(dr2, p.w_exc).contiguous(), dh, f.dh1_to_dc1, f.dh1_to_dh, dc1_out=dh1, dh_out=dh,
    )
    dr1 = _C.norm_vjp(dc1, f.xhat1, f.invstd1, kind1, weight1, groups1, out=dc1)
    return _C.vjp_gate_inh(conv_t(dr1, p.w_inh).contiguous(), dh, f.g1, f.dhg_to_dm1, pp.u1_weight, out=dh)


def vjp(v: Tensor, f: Factors, p: HGRUParams, conv_t: ConvFn = conv_same_transpose) -> Tensor:
    """J^T v at the point :func:`linearize` was taken."""
    v = _map(v)
    with torch.no_grad():
        return _vjp(v, f, _prepare(p, v), p, conv_t)


# --------------------------------------------------------------------------------------------
# The FFT conv's channel mix


def spectral_mix(z: Tensor, layout: Tensor, transpose: bool = False) -> Tensor:
    """:func:`crbp_fast.conv.fft.spectral_mix` on real views: z (B, X, P, 2) (``view_as_real``
    of the complex rfft2 output), ``layout`` from :func:`crbp_fast.conv.fft.mix_layout`;
    returns (B, Y, P, 2). One pass over the spectrum in tiles of 32 frequencies."""
    return _C.spectral_mix(z.contiguous(), layout, transpose)


def spectral_outer(p: Tensor, q: Tensor, rows: int, out: Tensor | None = None) -> Tensor:
    """:func:`crbp_fast.conv.fft.spectral_outer` on real views: p (B, O, P, 2), q (B, C, P, 2)
    of rfft2 outputs with ``rows`` = M -> S (P, 2C, O) of sum_b p[b, o] conj(q[b, c]), written
    into ``out`` (contiguous, overlapping neither input) when given."""
    return _C.spectral_outer(p.contiguous(), q.contiguous(), rows, out)


# --------------------------------------------------------------------------------------------
# The backend


def _param_tensors(p: HGRUParams) -> list[Tensor]:
    tensors = [t for t in p if isinstance(t, Tensor)]
    for spec in (p.norm_inh, p.norm_exc):
        tensors += [t for t in (spec.weight, spec.bias) if t is not None]
    return tensors


def _fused(p: HGRUParams, x: Tensor) -> bool:
    """Whether the kernels cover this call: a dtype they take on x's device, parameters of the
    same dtype and no autocast (which has the reference's semantics); otherwise the reference
    passes run, logged once per (device, dtype)."""
    ok = (
        x.dtype in _FUSED_DTYPES.get(x.device.type, ())
        and p.w_inh.dtype == x.dtype
        and not torch.is_autocast_enabled(x.device.type)
    )
    key = (x.device.type, x.dtype)
    if not ok and key not in _reference_logged:
        _reference_logged.add(key)
        autocast = " under autocast" if torch.is_autocast_enabled(x.device.type) else ""
        log.info(
            "backend 'native': no fused kernels for %s on %s with %s parameters%s; running the reference passes",
            x.dtype, x.device.type, p.w_inh.dtype, autocast,
        )
    return ok


def _needs_graph(p: HGRUParams, x: Tensor, h: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (x, h, *_param_tensors(p)))


def _backend_step(p: HGRUParams, x: Tensor, h: Tensor, conv: ConvEngineLike) -> Tensor:
    """F(x, h): the fused passes when no gradient is needed, else the reference composition.

    A step that autograd must differentiate (grad mode on and x, h or a parameter requiring
    grad) runs :func:`crbp_fast.hgru.reference.step` (bptt's steps; rbp / crbp call
    ``HGRUCell.tracked_step`` instead, whose fused passes are :mod:`crbp_fast.hgru.native.tracked`). Every untracked step (``torch.no_grad()``, as the fixed-point engine runs N - 1 of
    them) runs the fused kernels.
    """
    if _needs_graph(p, x, h) or not _fused(p, x):
        return reference.step(x, h, p, conv.conv)
    return step(x, h, p, conv.conv)


class NativeLinearization:
    """The step linearised at (x, h) with the fused passes: ``state`` and ``vjp(v) = J^T v``."""

    def __init__(self, p: HGRUParams, x: Tensor, h: Tensor, conv: ConvEngineLike):
        self._params = p
        self._conv = conv
        x, h = _map(x), _map(h)
        with torch.no_grad():
            self._prepared = _prepare(p, x)
            self._factors = _linearize(x, h, self._prepared, p, conv.conv)
        self.state = self._factors.state
        self._workspace = (torch.empty_like(self.state), torch.empty_like(self.state))

    @classmethod
    def from_factors(cls, p: HGRUParams, factors: Factors, conv: ConvEngineLike) -> "NativeLinearization":
        """The linearisation whose factors are already computed (the tracked step's, converted by
        :func:`crbp_fast.hgru.native.tracked.linearization`): no step, no conv."""
        self = cls.__new__(cls)
        self._params, self._conv, self._factors = p, conv, factors
        self._prepared = _prepare(p, factors.state)
        self.state = factors.state
        self._workspace = (torch.empty_like(self.state), torch.empty_like(self.state))
        return self

    def vjp(self, v: Tensor) -> Tensor:
        with torch.no_grad():
            return _vjp(
                _map(v), self._factors, self._prepared, self._params, self._conv.conv_transpose, self._workspace,
            )


def _backend_linearize(p: HGRUParams, x: Tensor, h: Tensor, conv: ConvEngineLike) -> Linearization:
    if not _fused(p, x):
        return PassLinearization(p, x, h, conv)
    return NativeLinearization(p, x, h, conv)


def _available(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and _C.with_cuda())


def _unavailable_reason(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "crbp_fast.hgru.native was built without its CUDA kernels (no CUDA-enabled torch or no nvcc at build "
            "time); rebuild it on a machine with both: CRBP_FAST_CUDA=1 pip install --no-build-isolation -e ."
        )
    return f"the native kernels run on CPU and CUDA devices, not {device.type}"


register_backend(Backend(
    name="native", step=_backend_step, linearize=_backend_linearize, available=_available,
    unavailable_reason=_unavailable_reason,
))

__all__ = [
    "Factors", "NativeLinearization", "excite_mix", "gate_inh", "inhibit", "linearize", "norm_stats",
    "norm_vjp", "normalize", "spectral_mix", "spectral_outer", "step", "vjp", "vjp_excite_mix", "vjp_gate_inh", "vjp_inhibit",
]
