"""Launchers of the fused hGRU kernels, registered as ``torch.library`` custom ops.

Each launcher makes its inputs contiguous, allocates its outputs with ``torch.empty`` and picks
the grid; its fake implementation states the output shapes and dtypes, so ``torch.compile``
traces a step or a VJP that calls these ops (the ops stay opaque to Inductor, the convolutions
and the small (B, C) statistics around them are compiled). Shapes: (B, C, H, W) activations,
per-channel parameters of C values (any shape), per-(b, c) coefficients of B * C values,
reduction partials (B, C, S) with S chunks per plane.

Dtypes: ``dtype`` is the storage dtype of the intermediate tensors and VJP factors (bfloat16 or
float16 under CUDA autocast, else the input's); statistics and partial sums are float32
(float64 for float64 inputs), the dtype every kernel accumulates in.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernels

_NS = "crbp_triton"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def plane_chunks(hw: int) -> int:
    """Chunks per (b, c) plane of the plane kernels: the S of their reduction partials."""
    return triton.cdiv(hw, kernels.PLANE_CHUNK)


def tile_chunks(hw: int) -> int:
    """Chunks per sample of the tile kernels: the S of their reduction partials."""
    return triton.cdiv(hw, kernels.TILE_CHUNK)


def plane_chunk_counts(hw: int, device: torch.device) -> Tensor:
    """Pixels in each chunk of a plane, (S,): CHUNK each, the last one ragged."""
    chunk = kernels.PLANE_CHUNK
    starts = torch.arange(plane_chunks(hw), device=device) * chunk
    return (hw - starts).clamp(max=chunk)


def _tl_acc(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _block_c(c: int) -> int:
    return triton.next_power_of_2(c)


def _on(t: Tensor):
    """Launch on the tensor's device (triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _contiguous(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def _pointers(tensors: list[Tensor], n: int) -> list[Tensor]:
    """``tensors`` padded to ``n`` with the first one: a kernel's disabled constexpr branches
    never touch the pointers they would write or read."""
    return tensors + tensors[:1] * (n - len(tensors))


def _partials(like: Tensor, chunks: int, count: int = 2) -> list[Tensor]:
    """``count`` (B, C, chunks) buffers of reduction partials in the accumulation dtype."""
    b, c = like.shape[:2]
    return [torch.empty(b, c, chunks, device=like.device, dtype=acc_dtype(like.dtype)) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Forward passes


@torch.library.custom_op(f"{_NS}::plane_moments", mutates_args=())
def plane_moments(c_raw: Tensor) -> list[Tensor]:
    """Per (b, c, chunk): [shift, mean of (value - shift), sum of squared deviations]."""
    (c_raw,) = _contiguous(c_raw)
    b, c, hgt, wid = c_raw.shape
    chunks = plane_chunks(hgt * wid)
    outs = _partials(c_raw, chunks, 3)
    with _on(c_raw):
        kernels.moments[(b * c, chunks)](
            c_raw, *outs, hgt * wid, chunks, CHUNK=kernels.PLANE_CHUNK, ACC=_tl_acc(c_raw),
        )
    return outs


@plane_moments.register_fake
def _(c_raw):
    return _partials(c_raw, plane_chunks(c_raw.shape[2] * c_raw.shape[3]), 3)


@torch.library.custom_op(f"{_NS}::gate_inh", mutates_args=())
def gate_inh(h: Tensor, u_weight: Tensor, u_bias: Tensor, dtype: torch.dtype, factors: bool) -> list[Tensor]:
    """[hg] = [h * sigma(U1 h + b1)]; with ``factors`` also [g1, h * sigma'(U1 h + b1)]."""
    h, u_weight, u_bias = _contiguous(h, u_weight, u_bias)
    b, c, hgt, wid = h.shape
    outs = [torch.empty(h.shape, device=h.device, dtype=dtype) for _ in range(3 if factors else 1)]
    with _on(h):
        kernels.gate_inh[(b, tile_chunks(hgt * wid))](
            h, u_weight, u_bias, *_pointers(outs, 3), c, hgt * wid,
            LIN=factors, CHUNK=kernels.TILE_CHUNK, BLOCK_C=_block_c(c), ACC=_tl_acc(h),
        )
    return outs


@gate_inh.register_fake
def _(h, u_weight, u_bias, dtype, factors):
    return [h.new_empty(h.shape, dtype=dtype) for _ in range(3 if factors else 1)]


@torch.library.custom_op(f"{_NS}::inhibit", mutates_args=())
def inhibit(
    c_raw: Tensor, x: Tensor, h: Tensor, nm: Tensor | None, ns: Tensor | None, nw: Tensor | None,
    nb: Tensor | None, alpha: Tensor, mu: Tensor, dtype: torch.dtype, factors: bool,
) -> list[Tensor]:
    """[h1]; with ``factors`` also [q1, q2] and, when normalised, [xhat1].

    ``nm``, ``ns`` (B * C values): xhat = (c_raw - nm) * ns; ``nw``, ``nb`` (C values): the norm's
    affine; all four None for norm "none".
    """
    c_raw, x, h, nm, ns, nw, nb, alpha, mu = _contiguous(c_raw, x, h, nm, ns, nw, nb, alpha, mu)
    b, c, hgt, wid = c_raw.shape
    norm = nm is not None
    count = 1 + (2 + int(norm) if factors else 0)
    outs = [torch.empty(h.shape, device=h.device, dtype=dtype) for _ in range(count)]
    with _on(h):
        kernels.inhibit[(b * c, plane_chunks(hgt * wid))](
            c_raw, x, h, *_pointers([nm, ns, nw, nb] if norm else [h], 4), alpha, mu,
            *_pointers(outs, 4), c, hgt * wid,
            NORM=norm, LIN=factors, CHUNK=kernels.PLANE_CHUNK, ACC=_tl_acc(h),
        )
    return outs


@inhibit.register_fake
def _(c_raw, x, h, nm, ns, nw, nb, alpha, mu, dtype, factors):
    count = 1 + (2 + int(nm is not None) if factors else 0)
    return [h.new_empty(h.shape, dtype=dtype) for _ in range(count)]


@torch.library.custom_op(f"{_NS}::excite_mix", mutates_args=())
def excite_mix(
    c_raw: Tensor, h: Tensor, h1: Tensor, nm: Tensor | None, ns: Tensor | None, nw: Tensor | None,
    nb: Tensor | None, u_weight: Tensor, u_bias: Tensor, kappa: Tensor, gamma: Tensor, omega: Tensor,
    out_dtype: torch.dtype, dtype: torch.dtype, factors: bool,
) -> list[Tensor]:
    """[F] (in ``out_dtype``); with ``factors`` also [p1, p2, p3, p4] and, normalised, [xhat2]."""
    c_raw, h, h1, nm, ns, nw, nb, u_weight, u_bias, kappa, gamma, omega = _contiguous(
        c_raw, h, h1, nm, ns, nw, nb, u_weight, u_bias, kappa, gamma, omega,
    )
    b, c, hgt, wid = c_raw.shape
    norm = nm is not None
    outs = [torch.empty(h.shape, device=h.device, dtype=out_dtype)]
    if factors:
        outs += [torch.empty(h.shape, device=h.device, dtype=dtype) for _ in range(4 + int(norm))]
    with _on(h):
        kernels.excite_mix[(b, tile_chunks(hgt * wid))](
            c_raw, h, h1, *_pointers([nm, ns, nw, nb] if norm else [h], 4), u_weight, u_bias,
            kappa, gamma, omega, *_pointers(outs, 6), c, hgt * wid,
            NORM=norm, LIN=factors, CHUNK=kernels.TILE_CHUNK, BLOCK_C=_block_c(c), ACC=_tl_acc(h),
        )
    return outs


@excite_mix.register_fake
def _(c_raw, h, h1, nm, ns, nw, nb, u_weight, u_bias, kappa, gamma, omega, out_dtype, dtype, factors):
    outs = [h.new_empty(h.shape, dtype=out_dtype)]
    if factors:
        outs += [h.new_empty(h.shape, dtype=dtype) for _ in range(4 + int(nm is not None))]
    return outs


# --------------------------------------------------------------------------------------------
# VJP passes


@torch.library.custom_op(f"{_NS}::vjp_excite_mix", mutates_args=())
def vjp_excite_mix(
    v: Tensor, p1: Tensor, p2: Tensor, p3: Tensor, xhat: Tensor | None, u_weight: Tensor,
) -> list[Tensor]:
    """[dc2, dh1 without the exc-conv term]; normalised also [sum dc2, sum dc2 xhat2], partials
    of shape (B, C, tile chunks)."""
    v, p1, p2, p3, xhat, u_weight = _contiguous(v, p1, p2, p3, xhat, u_weight)
    b, c, hgt, wid = v.shape
    chunks = tile_chunks(hgt * wid)
    norm = xhat is not None
    outs = [torch.empty(v.shape, device=v.device, dtype=p1.dtype) for _ in range(2)]
    if norm:
        outs += _partials(p1, chunks)
    with _on(v):
        kernels.vjp_excite_mix[(b, chunks)](
            v, p1, p2, p3, xhat if norm else v, u_weight, *_pointers(outs, 4), c, hgt * wid, chunks,
            NORM=norm, CHUNK=kernels.TILE_CHUNK, BLOCK_C=_block_c(c), ACC=_tl_acc(p1),
        )
    return outs


@vjp_excite_mix.register_fake
def _(v, p1, p2, p3, xhat, u_weight):
    outs = [v.new_empty(v.shape, dtype=p1.dtype) for _ in range(2)]
    if xhat is not None:
        outs += _partials(p1, tile_chunks(v.shape[2] * v.shape[3]))
    return outs


@torch.library.custom_op(f"{_NS}::norm_vjp", mutates_args=())
def norm_vjp(dy: Tensor, xhat: Tensor, ka: Tensor, kb: Tensor, kc: Tensor) -> Tensor:
    """ka * dy + kb + kc * xhat with per-(b, c) coefficients (B * C values each)."""
    dy, xhat, ka, kb, kc = _contiguous(dy, xhat, ka, kb, kc)
    b, c, hgt, wid = dy.shape
    out = torch.empty_like(dy)
    with _on(dy):
        kernels.norm_vjp[(b * c, plane_chunks(hgt * wid))](
            dy, xhat, ka, kb, kc, out, hgt * wid, CHUNK=kernels.PLANE_CHUNK, ACC=_tl_acc(ka),
        )
    return out


@norm_vjp.register_fake
def _(dy, xhat, ka, kb, kc):
    return torch.empty_like(dy)


@torch.library.custom_op(f"{_NS}::vjp_inhibit", mutates_args=())
def vjp_inhibit(
    dh1: Tensor, t: Tensor, q1: Tensor, q2: Tensor, v: Tensor, p4: Tensor, xhat: Tensor | None,
) -> list[Tensor]:
    """[dc1, dh so far] from dh1 = ``dh1`` + ``t`` (``t``: the exc-conv term); normalised also
    [sum dc1, sum dc1 xhat1], partials of shape (B, C, plane chunks)."""
    dh1, t, q1, q2, v, p4, xhat = _contiguous(dh1, t, q1, q2, v, p4, xhat)
    b, c, hgt, wid = dh1.shape
    chunks = plane_chunks(hgt * wid)
    norm = xhat is not None
    outs = [torch.empty(v.shape, device=v.device, dtype=q1.dtype) for _ in range(2)]
    if norm:
        outs += _partials(q1, chunks)
    with _on(v):
        kernels.vjp_inhibit[(b * c, chunks)](
            dh1, t, q1, q2, v, p4, xhat if norm else v, *_pointers(outs, 4), hgt * wid, chunks,
            NORM=norm, CHUNK=kernels.PLANE_CHUNK, ACC=_tl_acc(q1),
        )
    return outs


@vjp_inhibit.register_fake
def _(dh1, t, q1, q2, v, p4, xhat):
    outs = [v.new_empty(v.shape, dtype=q1.dtype) for _ in range(2)]
    if xhat is not None:
        outs += _partials(q1, plane_chunks(v.shape[2] * v.shape[3]))
    return outs


@torch.library.custom_op(f"{_NS}::vjp_gate_inh", mutates_args=())
def vjp_gate_inh(
    t: Tensor, dh: Tensor, g1: Tensor, s1: Tensor, u_weight: Tensor, out_dtype: torch.dtype,
) -> Tensor:
    """J^T v = dh + t g1 + U1^T (t s1) in ``out_dtype`` (``t`` = W_inh^T (*) dr1)."""
    t, dh, g1, s1, u_weight = _contiguous(t, dh, g1, s1, u_weight)
    b, c, hgt, wid = t.shape
    out = torch.empty(t.shape, device=t.device, dtype=out_dtype)
    with _on(t):
        kernels.vjp_gate_inh[(b, tile_chunks(hgt * wid))](
            t, dh, g1, s1, u_weight, out, c, hgt * wid,
            CHUNK=kernels.TILE_CHUNK, BLOCK_C=_block_c(c), ACC=_tl_acc(g1),
        )
    return out


@vjp_gate_inh.register_fake
def _(t, dh, g1, s1, u_weight, out_dtype):
    return t.new_empty(t.shape, dtype=out_dtype)
