"""FFT 'same' cross-correlation with cached kernel spectra: the ``conv="fft"`` engine.

Math. For x (B, C, H, W) and w (O, C, k, k), k odd, p = k // 2, the 'same' zero-padded
cross-correlation of :func:`crbp_fast.hgru.reference.conv_same` (``F.conv2d(x, w, padding=p)``) is

    y[b, o, m, n] = sum_{c, i, j} w[o, c, i, j] x[b, c, m + i - p, n + j - p]   (x = 0 outside)

Put x in the top-left corner of an M x N zero array and the kernel at wrapped offsets,
``K[o, c, (p - i) mod M, (p - j) mod N] = w[o, c, i, j]``. The circular convolution of the two
equals y on [0, H) x [0, W) whenever M >= H + p and N >= W + p: a tap that leaves the image
lands in the zero band of width >= p and never wraps back inside it. So, with ``^`` = rfft2 at
size (M, N),

    y       = irfft2( sum_c K^[o, c] x^[b, c] )[:H, :W]
    x_adj   = irfft2( sum_o conj(K^[o, c]) y^[b, o] )[:H, :W]       (reference.conv_same_transpose)

the second line being the adjoint in the input (the flipped kernel has the conjugate spectrum;
the channel mix is transposed). M and N are the smallest 2, 3, 5, 7-smooth sizes >= H + p and
W + p (160 at H = 150, k = 15, against 168 for the full linear convolution). K^ itself is never
padded and FFT'd: only k x k taps are non-zero, so it is two small DFT matmuls
(:func:`kernel_spectrum`).

Transforms. One rfft2 per conv input and one inverse per output: the inverse is an ifft along
the rows followed by an irfft along the columns of only the H rows the crop keeps (the c2r
transform of the M - H rows that would be cropped is skipped).

Channel mix. Per frequency f it is a (B x C) by (C x O) complex product, done as one real
batched matmul over the F = (N/2 + 1) M frequencies (ordered column-major, v then u). The
spectrum is stored as S = [a; b], (F, 2C, O), for K^ = a + ib (a[c, o] = Re K^[o, c]): the least
memory a complex kernel spectrum can take (at small B the mix streams S and little else, so its
size is the cost of the mix). The forward mix multiplies "doubled" input rows, [xr, -xi] and
[xi, xr] per sample, by S, which gives [Re y^; Im y^]; the adjoint multiplies [Re y^; Im y^]
by S^T and adds the four blocks it gives into Re and Im (:func:`_mix_adjoint`).

Mix kernel. Where a fused kernel is available (the native C++ one on CPU;
``CRBP_FAST_FFT_MIX`` = ``auto``, ``torch``, ``native`` or ``triton`` picks), the mix runs
instead on the transform's own layout, with no transpose, stack or doubled rows:
:func:`spectral_mix` over the (B, X, P) spectrum, P = M (N/2 + 1) frequencies in rfft2 order
(u, v), against a second layout of the spectrum, (ceil(P / 32), O, C, 2, 32) real (tiles of 32
frequencies, real parts then imaginary parts; :func:`mix_layout`), kept beside S for the same
lifetime. The autograd paths (the spectrum gradient) still use S and the batched matmul. On CUDA
``auto`` keeps the batched matmul (cuBLAS): the CUDA and Triton mix kernels are compiled and
tested but not yet timed against it on a GPU.

Weight gradient. With G = dL/dRe z + i dL/dIm z for the mixed spectrum z = K^ x^ (G is the
rfft2 of the output gradient times w_v / (M N), w_v = 1 at v = 0 and v = N / 2, else 2: the
adjoint of the half-spectrum inverse), dL/dK^[o, c] = sum_b G[b, o] conj(x^[b, c]) (and for the
adjoint conv, sum_b y^[b, o] conj(G[b, c])), one batched matmul of the doubled rows with the
other operand's rows. Every use of a weight adds such a term to one spectrum gradient, which
:func:`kernel_spectrum_adjoint` maps back to the k x k taps once per weight.

Spectra lifetime. A spectrum is valid for exactly the weight values it was computed from:
- inside a :class:`SpectraScope` (``fixed_point`` opens one per call and re-enters it in its
  backward), each weight's spectrum is computed once, pinned, and used by every step, the
  tracked step, the penalty and every adjoint product, then dropped with the scope;
- outside one (a standalone ``cell(x, h)``), the engine keeps the last spectra of each weight
  with a copy of the weight's values, and reuses them only if the weight is still bitwise equal
  to that copy (checked per call: a k x k x C x O comparison, ~0.1 ms at C = 25, k = 15, and a
  host sync on CUDA). A write through ``weight.data``, a numpy view or ``set_`` cannot leave a
  stale spectrum in use.
A spectrum takes F (2C) O values (65 MB in float32 at C = 25, 150 x 150).

Autograd. :class:`_Correlate` is the conv as one autograd node; its backward computes the input
gradient with the opposite conv (the same spectrum, so double backward recurses through the
same node) and the spectrum gradient as above. The spectrum enters the graph through
:class:`_SpectrumOfWeight` (identity forward, :func:`kernel_spectrum_adjoint` backward), one
node per weight and scope, so all the spectrum gradients of a weight in a training iteration
are summed before the one adjoint. When the backward itself is differentiated
(``create_graph=True``, the LCP penalty) it runs on differentiable torch ops, and a create_graph
backward that will not reach the spectrum (the LCP's d/dh) skips its gradient. Forward mode
(``torch.autograd.forward_ad``) works too: the conv node's jvp convolves each tangent with the
other primal (the reference's forward-mode LCP gradient runs through it).
:meth:`FFTConv.weight_grad` is the weight gradient on its own (the spectrum gradient mapped back
to the taps), for explicit backward passes: of one pair (x, dy) or of several (the sum, one
spectrum product); inside the explicit backward's transform memo (:class:`_TransformMemo`)
the operands' transforms come from it where a conv already made them.

float16 / bfloat16 inputs are computed in float32 and the result cast back; float64 stays
float64; under autocast the result takes the autocast dtype, as ``F.conv2d``'s does. The same
code runs on CUDA (cuFFT through ``torch.fft``).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import weakref
from collections import OrderedDict
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

_REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: FFT sizes kept per weight outside a scope (different image sizes); the least recently used goes first.
_SIZES_PER_WEIGHT = 4


def smooth_size(n: int) -> int:
    """The smallest integer >= n whose prime factors are all in {2, 3, 5, 7}."""
    m = max(int(n), 1)
    while True:
        r = m
        for q in (2, 3, 5, 7):
            while r % q == 0:
                r //= q
        if r == 1:
            return m
        m += 1


def fft_shape(height: int, width: int, kernel_size: int) -> tuple[int, int]:
    """(M, N): the FFT size of a 'same' correlation of an H x W image with a k x k kernel."""
    pad = kernel_size // 2
    return smooth_size(height + pad), smooth_size(width + pad)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any operand is float64, else float32 (half precisions are computed in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _dft_factors(
    kernel_size: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
) -> tuple[Tensor, Tensor]:
    """The two factors of the kernel's DFT, whose real and imaginary parts are stacked on dim 0:
    A[u, i] = exp(-2 pi i u m_i / M) (2, M, k) and Bv[v, j] = exp(-2 pi i v n_j / N) (2, N/2 + 1, k),
    where m_i = (p - i) mod M and n_j = (p - j) mod N are the wrapped kernel offsets."""
    pad = kernel_size // 2
    taps = torch.arange(kernel_size, device=device)
    factors = []
    for size, freqs in ((shape[0], shape[0]), (shape[1], shape[1] // 2 + 1)):
        offsets = (pad - taps) % size
        # Reduce u * m_i modulo the size in integers, so the angle is exact before the cos/sin.
        turns = (torch.arange(freqs, device=device)[:, None] * offsets[None, :]) % size
        angle = turns.to(torch.float64) * (-2.0 * math.pi / size)
        factors.append(torch.stack((angle.cos(), angle.sin())).to(dtype))
    return factors[0], factors[1]


def _row_factor(a_fac: Tensor) -> Tensor:
    """(2M, 2k): row (u, s), column (t, i) maps [Re; Im] of R = w Bv^T to [a; b] of K^ = A R."""
    ar, ai = a_fac[0], a_fac[1]
    return torch.stack((torch.cat((ar, -ai), 1), torch.cat((ai, ar), 1)), 1).reshape(2 * ar.shape[0], -1)


def kernel_spectrum(weight: Tensor, shape: tuple[int, int]) -> Tensor:
    """Spectrum S = [a; b] of ``weight`` (O, C, k, k) at FFT size ``shape``: (F, 2C, O),
    F = (N/2 + 1) M frequencies ordered (v, u), row s C + c and column o holding a = Re K^[o, c]
    (s = 0) or b = Im K^[o, c] (s = 1), in ``weight``'s dtype.

    K^ = A w Bv^T per (o, c) (the factors of :func:`_dft_factors`): the k x k kernel is
    transformed by two real matmuls instead of being padded to M x N for O C FFTs.
    """
    out_ch, in_ch, k, _ = weight.shape
    m, n = shape
    nh = n // 2 + 1
    a_fac, b_fac = _dft_factors(k, shape, weight.dtype, weight.device)
    # Along j: R[t, o, c, i, v] = sum_j w[o, c, i, j] Bv[t, v, j], then laid out (v, (t, i), (c, o)).
    rows = torch.matmul(weight.reshape(-1, k), b_fac.transpose(1, 2))  # (2, O C k, Nh)
    rows = rows.reshape(2, out_ch, in_ch, k, nh).permute(4, 0, 3, 2, 1).reshape(nh, 2 * k, in_ch * out_ch)
    # Along i, per v: [a; b] = [[Ar, -Ai], [Ai, Ar]] [Rr; Ri], rows (u, s): S in its final layout.
    return torch.matmul(_row_factor(a_fac), rows).reshape(nh * m, 2 * in_ch, out_ch)


def kernel_spectrum_adjoint(grad: Tensor, kernel_size: int, shape: tuple[int, int]) -> Tensor:
    """The adjoint of :func:`kernel_spectrum`: (F, 2C, O) -> (O, C, k, k), by differentiable ops
    (the two matmuls transposed: only the k x k taps of the inverse transform are formed)."""
    m, n = shape
    nh = n // 2 + 1
    k = kernel_size
    in_ch, out_ch = grad.shape[1] // 2, grad.shape[2]
    a_fac, b_fac = _dft_factors(k, shape, grad.dtype, grad.device)
    t = torch.matmul(_row_factor(a_fac).T, grad.reshape(nh, 2 * m, in_ch * out_ch))  # (Nh, 2k, C O)
    t = t.reshape(nh, 2, k, in_ch, out_ch).permute(4, 3, 2, 1, 0).reshape(out_ch * in_ch * k, 2 * nh)
    return (t @ b_fac.reshape(2 * nh, k)).reshape(out_ch, in_ch, k, k)


# --------------------------------------------------------------------------------------------
# Transforms and the channel mix. "rows" are (F, 2B, X) real matrices, one per frequency; every
# function here is plain differentiable torch ops (forward mode included).


def _rows(z: Tensor) -> Tensor:
    """Complex (B, X, M, Nh) -> (F, 2B, X) rows [Re; Im] per sample, F ordered (v, u)."""
    b, x, m, nh = z.shape
    return torch.view_as_real(z).permute(3, 2, 0, 4, 1).reshape(nh * m, 2 * b, x)


def _doubled_rows(z: Tensor) -> Tensor:
    """Complex (B, X, M, Nh) -> (F, 2B, 2X) rows conj(z) and i conj(z) per sample, in the
    column order of S's rows (s X + x): [zr | -zi] and [zi | zr], which S maps to [Re; Im] of the mix."""
    b, x, m, nh = z.shape
    # One transpose that moves whole complex numbers, then one stack within cache-sized rows
    # (measured 1.6x faster than strided copies straight from z; few ops, since on a loaded
    # machine each parallel op may wait for a descheduled thread).
    zt = torch.view_as_real(z.permute(3, 2, 0, 1).contiguous())  # (Nh, M, B, X, 2)
    zr, zi = zt[..., 0], zt[..., 1]
    return torch.stack((zr, -zi, zi, zr), 3).reshape(nh * m, 2 * b, 2 * x)


def _mix(rows: Tensor, spectrum: Tensor, batch: int, m: int) -> Tensor:
    """sum_c K^[o, c] x^[b, c] from the doubled rows (F, 2B, 2C): complex (B, O, M, Nh), a
    permuted view (the row ifft of :func:`_inverse` reads it in place)."""
    f = rows.shape[0]
    mixed = torch.bmm(rows, spectrum).reshape(f // m, m, batch, 2, spectrum.shape[2])  # (Nh, M, B, t, O)
    return torch.view_as_complex(torch.stack((mixed[:, :, :, 0], mixed[:, :, :, 1]), -1)).permute(2, 3, 1, 0)


def _mix_adjoint(p: Tensor, spectrum: Tensor, batch: int, m: int) -> Tensor:
    """sum_o conj(K^[o, c]) y^[b, o] from rows [Re y^; Im y^] (F, 2B, O): complex (B, C, M, Nh),
    a permuted view.

    R = [Yr; Yi] S^T holds Yr a^T, Yr b^T, Yi a^T and Yi b^T; then Re = Yr a^T + Yi b^T and
    Im = Yi a^T - Yr b^T."""
    f = p.shape[0]
    c = spectrum.shape[1] // 2
    r = torch.bmm(p, spectrum.mT).reshape(f // m, m, batch, 2, 2, c)  # (Nh, M, B, t, s, C)
    re = r[:, :, :, 0, 0] + r[:, :, :, 1, 1]
    im = r[:, :, :, 1, 0] - r[:, :, :, 0, 1]
    return torch.view_as_complex(torch.stack((re, im), -1)).permute(2, 3, 1, 0)


def _inverse(z: Tensor, shape: tuple[int, int], height: int, width: int) -> Tensor:
    """irfft2(z, s=shape)[..., :H, :W]: the column ifft, then the c2r transform of the H kept rows."""
    if z.device.type == "cpu" and not _tracked(z):
        # torch moves the transformed dim last before its c2c (a full transpose copy of z), so
        # on CPU its column ifft cost about 4x an rfft2; pocketfft (scipy.fft) transforms the
        # strided axis in place: 4.5-5 against 11-13 ms for the whole inverse at B2-C25-160x81
        # (one thread, this CPU). Not differentiable: only for tensors outside autograd.
        cols = torch.from_numpy(_scipy_fft().ifft(z.detach().resolve_conj().resolve_neg().numpy(), axis=-2, workers=torch.get_num_threads()))
        rows = cols[..., :height, :]
    else:
        # The row ifft's output is column-major; made contiguous before the c2r (which would
        # copy it anyway, more slowly: 18.7 against 25.1 ms at B4-C25-160x81, one thread).
        rows = torch.fft.ifft(z, dim=-2)[..., :height, :].contiguous()
    return torch.fft.irfft(rows, n=shape[1], dim=-1)[..., :width].contiguous()


def _tracked(t: Tensor) -> bool:
    """Whether anything records the ops on ``t``: autograd (reverse mode with grad on, or a
    forward-mode tangent), a functorch transform (vmap, grad, jvp), a tracer (torch.jit.trace,
    make_fx and other dispatch modes, torch.compile) or a tensor subclass. A pocketfft call is
    opaque to all of them (a tracer would record its result as a constant), so only a plain
    tensor that nothing records takes it."""
    if (t.requires_grad and torch.is_grad_enabled()) or _has_tangent(t):
        return True
    return _traced(t)


def _traced(t: Tensor) -> bool:
    """Whether a tracer, a functorch transform or a tensor subclass sees the ops on ``t`` (the
    part of :func:`_tracked` that an autograd.Function does not cover): an extension kernel or a
    kept transform would be recorded as a constant there."""
    if type(t) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t) or torch.jit.is_tracing():
        return True
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _scipy_fft():
    import scipy.fft

    return scipy.fft


def _grad_weights(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """w_v / (M N) per column v, (Nh, 1, 1): the adjoint of the half-spectrum inverse."""
    m, n = shape
    nh = n // 2 + 1
    w = torch.full((nh,), 2.0 / (m * n), dtype=dtype, device=device)
    w[0] = 1.0 / (m * n)
    if n % 2 == 0:
        w[-1] = 1.0 / (m * n)
    return w.reshape(nh, 1, 1)


def _scaled(rows: Tensor, weights: Tensor) -> Tensor:
    f, r, x = rows.shape
    nh = weights.shape[0]
    return (rows.reshape(nh, (f // nh) * r, x) * weights).reshape(f, r, x)


#: Frequencies per tile of :func:`mix_layout` (the fused mix kernels' tile; csrc/hgru.h kSpectralMixLanes).
MIX_LANES = 32
MIX_KERNELS = ("auto", "torch", "native", "triton")
MIX_ENV_VAR = "CRBP_FAST_FFT_MIX"


def mix_layout(spectrum: Tensor, shape: tuple[int, int]) -> Tensor:
    """S (F, 2C, O), F ordered (v, u), as the fused mix's layout (ceil(P / 32), O, C, 2, 32):
    entry [t, o, c, s, l] is Re (s = 0) or Im (s = 1) of K^[o, c] at frequency p = 32 t + l in
    rfft2 order (p = u (N/2 + 1) + v), zero past P = M (N/2 + 1)."""
    m, n = shape
    nh = n // 2 + 1
    f, two_c, out_ch = spectrum.shape
    in_ch = two_c // 2
    if f != m * nh or two_c % 2:
        raise ValueError(f"spectrum: expected shape ({m * nh}, 2C, O) for FFT size {shape}, got {tuple(spectrum.shape)}")
    planes = m * nh
    tiles = -(-planes // MIX_LANES)
    k = spectrum.reshape(nh, m, 2, in_ch, out_ch).permute(1, 0, 4, 3, 2).reshape(planes, out_ch, in_ch, 2)
    if tiles * MIX_LANES != planes:
        k = torch.cat((k, k.new_zeros(tiles * MIX_LANES - planes, out_ch, in_ch, 2)))
    return k.reshape(tiles, MIX_LANES, out_ch, in_ch, 2).permute(0, 2, 3, 4, 1).contiguous()


def spectral_mix(z: Tensor, layout: Tensor, transpose: bool = False) -> Tensor:
    """The channel mix on the transform's layout, reference (plain torch ops): z complex
    (B, X, P); ``layout`` from :func:`mix_layout`. Returns sum_c K^[o, c] z[b, c] (B, O, P), or
    with ``transpose`` sum_o conj(K^[o, c]) z[b, o] (B, C, P). The fused kernels
    (:func:`crbp_fast.hgru.native.hgru.spectral_mix`, :func:`crbp_fast.hgru.triton.hgru.spectral_mix`)
    compute the same on ``torch.view_as_real`` of z."""
    planes = z.shape[-1]
    tiles, out_ch, in_ch = layout.shape[:3]
    k = torch.view_as_complex(layout.permute(1, 2, 0, 4, 3).contiguous()).reshape(out_ch, in_ch, tiles * MIX_LANES)
    k = k[..., :planes]
    if transpose:
        return torch.einsum("ocp,bop->bcp", k.conj(), z)
    return torch.einsum("ocp,bcp->bop", k, z)


def mix_layout_inverse(layout: Tensor, shape: tuple[int, int]) -> Tensor:
    """The inverse of :func:`mix_layout`: (ceil(P / 32), O, C, 2, 32) -> S (F, 2C, O)."""
    m, n = shape
    nh = n // 2 + 1
    tiles, out_ch, in_ch = layout.shape[:3]
    k = layout.permute(0, 4, 1, 2, 3).reshape(tiles * MIX_LANES, out_ch, in_ch, 2)[: m * nh]
    return k.reshape(m, nh, out_ch, in_ch, 2).permute(1, 0, 4, 3, 2).reshape(nh * m, 2 * in_ch, out_ch)


def spectral_outer(p: Tensor, q: Tensor, rows: int) -> Tensor:
    """The spectrum gradient's product, reference (plain torch ops): p complex (B, O, P), q
    complex (B, C, P), P = M (N/2 + 1) frequencies in rfft2 order, ``rows`` = M -> S-layout
    (F, 2C, O) of D[o, c] = sum_b p[b, o] conj(q[b, c]) (Re in rows s = 0, Im in s = 1). For a
    forward conv dL/dS = spectral_outer(G, x^); for the adjoint conv spectral_outer(y^, G)
    (module docstring: G, the output gradient's rfft2 weighted by w_v / (M N))."""
    d = torch.view_as_real(torch.einsum("bop,bcp->ocp", p, q.conj()))  # (O, C, P, 2)
    out_ch, in_ch, planes = d.shape[:3]
    cols = planes // rows
    return d.reshape(out_ch, in_ch, rows, cols, 2).permute(3, 2, 4, 1, 0).reshape(planes, 2 * in_ch, out_ch)


class MixKernel(NamedTuple):
    """A fused implementation of :func:`spectral_mix` and :func:`spectral_outer` on real views."""

    name: str
    mix: object  # (z (B, X, P, 2), layout, transpose) -> (B, Y, P, 2)
    outer: object  # (p (B, O, P, 2), q (B, C, P, 2), rows M, out=None) -> S (F, 2C, O)


def _mix_kernel(device: torch.device, dtype: torch.dtype) -> MixKernel | None:
    """The fused mix for tensors on ``device`` in ``dtype`` (float32 / float64), or None for
    the batched-matmul path; ``CRBP_FAST_FFT_MIX`` overrides ``auto``."""
    choice = os.environ.get(MIX_ENV_VAR, "auto") or "auto"
    if choice not in MIX_KERNELS:
        raise ValueError(f"{MIX_ENV_VAR}: expected one of {MIX_KERNELS}, got {choice!r}")
    if choice == "torch" or dtype not in (torch.float32, torch.float64):
        return None
    if choice == "auto":
        choice = "native" if device.type == "cpu" else "torch"
        if choice == "torch":
            return None
    if choice == "native":
        try:
            from ..hgru.native import hgru as native_hgru
        except ImportError as err:
            if os.environ.get(MIX_ENV_VAR):
                raise RuntimeError(f"{MIX_ENV_VAR}=native but the native extension cannot be imported: {err}") from None
            return None
        if device.type == "cuda" and not native_hgru._C.with_cuda():
            raise RuntimeError(f"{MIX_ENV_VAR}=native on {device} but the extension was built without CUDA")
        if device.type not in ("cpu", "cuda"):
            return None
        return MixKernel("native", native_hgru.spectral_mix, native_hgru.spectral_outer)
    # triton
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{MIX_ENV_VAR}=triton needs a CUDA device (or TRITON_INTERPRET=1), got {device}")
    from ..hgru.triton import hgru as triton_hgru
    return MixKernel("triton", triton_hgru.spectral_mix, triton_hgru.spectral_outer)


def _fused_mixed(z: Tensor, layout: Tensor, transpose: bool, kernel) -> Tensor:
    """The fused mix of the complex rfft2 output z (B, X, M, Nh): complex (B, Y, M, Nh)."""
    b, x, m, nh = z.shape
    out = kernel.mix(torch.view_as_real(z).reshape(b, x, m * nh, 2), layout, transpose)
    return torch.view_as_complex(out).reshape(b, -1, m, nh)


def correlate(x: Tensor, spectrum: Tensor, shape: tuple[int, int], transpose: bool = False) -> Tensor:
    """'same' correlation of ``x`` (B, C, H, W) with the kernel whose spectrum is given (or its
    adjoint with ``transpose``): rfft2, the channel mix, the cropped inverse. Plain torch ops
    (differentiable); ``x`` and ``spectrum`` share a float32 or float64 dtype."""
    b, _, h, w = x.shape
    z = torch.fft.rfft2(x, s=shape)
    if transpose:
        mixed = _mix_adjoint(_rows(z), spectrum, b, shape[0])
    else:
        mixed = _mix(_doubled_rows(z), spectrum, b, shape[0])
    return _inverse(mixed, shape, h, w)


def spectrum_gradient(x: Tensor, grad: Tensor, shape: tuple[int, int], transpose: bool = False) -> Tensor:
    """dL/dS (F, 2C, O) of ``correlate(x, S, shape, transpose)`` for the output gradient ``grad``."""
    weights = _grad_weights(shape, x.dtype, x.device)
    zx, zg = torch.fft.rfft2(x, s=shape), torch.fft.rfft2(grad, s=shape)
    if transpose:  # sum_b y^[b, o] conj(G[b, c])
        return torch.bmm(_scaled(_doubled_rows(zg), weights).mT, _rows(zx))
    return torch.bmm(_doubled_rows(zx).mT, _scaled(_rows(zg), weights))  # sum_b G[b, o] conj(x^[b, c])


def _describe(v: object) -> str:
    if isinstance(v, Tensor):
        return f"a tensor of shape {tuple(v.shape)}"
    if isinstance(v, (tuple, list)):
        return f"a {type(v).__name__} of {len(v)}"
    return type(v).__name__


def _cat(zs: list[Tensor]) -> Tensor:
    return zs[0] if len(zs) == 1 else torch.cat(zs)


def _fused_spectrum_gradient(zx: Tensor, zg: Tensor, shape: tuple[int, int], kernel: MixKernel) -> Tensor:
    """:func:`spectrum_gradient` (forward conv) by the fused outer product (not differentiable),
    from the rfft2 of the input and of the output gradient (complex (B, C, M, Nh), (B, O, M, Nh))."""
    b = zx.shape[0]
    weights = _grad_weights(shape, zx.real.dtype, zx.device).reshape(-1)
    zg = torch.view_as_real(zg * weights).reshape(b, zg.shape[1], -1, 2)
    zx = torch.view_as_real(zx).reshape(b, zx.shape[1], -1, 2)
    return kernel.outer(zg, zx, shape[0])


def _has_tangent(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent (torch.autograd.forward_ad)."""
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _will_run(node) -> bool:
    """Whether the running backward will execute ``node`` (True where torch cannot tell)."""
    check = getattr(torch._C, "_will_engine_execute_node", None)
    if check is None:
        return True
    try:
        return bool(check(node))
    except RuntimeError:
        return True


class _Correlate(torch.autograd.Function):
    """``correlate`` as one node: the input gradient by the opposite conv from the same spectrum,
    the spectrum gradient from the rows of the forward's transform (saved) and of the gradient's."""

    @staticmethod
    def forward(ctx, x: Tensor, spectrum: Tensor, shape: tuple[int, int], transpose: bool,
                layout: Tensor | None = None, kernel=None, z: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        if z is None:  # else x's rfft2 at this size, given (the no-graph path with a transform memo)
            z = torch.fft.rfft2(x, s=shape)
        needs_rows = ctx.needs_input_grad[1]
        # The spectrum gradient needs the input's transform: as rows for the batched matmul, as
        # it is for the fused outer product.
        rows = (_rows(z) if transpose else _doubled_rows(z)) if (needs_rows or kernel is None) else None
        if kernel is not None and needs_rows:
            rows = z
        if kernel is not None:
            mixed = _fused_mixed(z, layout, transpose, kernel)
        elif transpose:
            mixed = _mix_adjoint(rows, spectrum, b, shape[0])
        else:
            mixed = _mix(rows, spectrum, b, shape[0])
        ctx.shape, ctx.transpose = shape, transpose
        ctx.layout, ctx.kernel = layout, kernel
        ctx.spectrum_node = spectrum.grad_fn
        ctx.save_for_backward(x, spectrum, rows if needs_rows else None)
        ctx.save_for_forward(x, spectrum)
        return _inverse(mixed, shape, h, w)

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, spectrum_t: Tensor | None, *_):
        """Forward mode (bilinear in x and the spectrum): the conv of each tangent with the other primal."""
        x, spectrum = ctx.saved_tensors
        out = None
        if x_t is not None:
            out = correlate(x_t, spectrum, ctx.shape, ctx.transpose)
        if spectrum_t is not None:
            term = correlate(x, spectrum_t, ctx.shape, ctx.transpose)
            out = term if out is None else out + term
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, spectrum, rows = ctx.saved_tensors
        shape, transpose = ctx.shape, ctx.transpose
        grad = grad.contiguous()
        layout, kernel = ctx.layout, ctx.kernel
        if torch.is_grad_enabled():  # create_graph: differentiable all the way
            gx = _Correlate.apply(grad, spectrum, shape, not transpose, layout, kernel) if ctx.needs_input_grad[0] else None
            # The LCP's first backward asks for d/dh only: the spectrum's node will not run, so
            # its gradient (a recorded (F, 2C, O) product) would be built for nothing.
            node = ctx.spectrum_node
            wanted = ctx.needs_input_grad[1] and (node is None or _will_run(node))
            gs = spectrum_gradient(x, grad, shape, transpose) if wanted else None
            return gx, gs, None, None, None, None, None
        b, _, h, w = grad.shape
        zg = torch.fft.rfft2(grad, s=shape)
        gx = gs = None
        weights = _grad_weights(shape, grad.dtype, grad.device)
        if kernel is not None:
            if ctx.needs_input_grad[0]:
                gx = _inverse(_fused_mixed(zg, layout, not transpose, kernel), shape, h, w)
            if ctx.needs_input_grad[1]:
                gw = torch.view_as_real(zg * weights.reshape(-1))  # (B, Y, M, Nh, 2)
                zx = torch.view_as_real(rows)
                gw, zx = gw.reshape(b, gw.shape[1], -1, 2), zx.reshape(b, zx.shape[1], -1, 2)
                gs = kernel.outer(zx, gw, shape[0]) if transpose else kernel.outer(gw, zx, shape[0])
            return gx, gs, None, None, None, None, None
        if transpose:  # the opposite conv is the forward one: doubled rows of the gradient
            g_rows = _doubled_rows(zg) if ctx.needs_input_grad[1] or gx is None else None
            if ctx.needs_input_grad[0] and gx is None:
                gx = _inverse(_mix(g_rows, spectrum, b, shape[0]), shape, h, w)
            if ctx.needs_input_grad[1]:
                gs = torch.bmm(_scaled(g_rows, weights).mT, rows)
        else:
            g_rows = _rows(zg) if ctx.needs_input_grad[1] or gx is None else None
            if ctx.needs_input_grad[0] and gx is None:
                gx = _inverse(_mix_adjoint(g_rows, spectrum, b, shape[0]), shape, h, w)
            if ctx.needs_input_grad[1]:
                gs = torch.bmm(rows.mT, _scaled(g_rows, weights))
        return gx, gs, None, None, None, None, None


class _SpectrumOfWeight(torch.autograd.Function):
    """Identity on the cached spectrum in the forward, linking it to ``weight`` for autograd.

    The weight -> spectrum map is linear, so its backward (:func:`kernel_spectrum_adjoint`) does
    not depend on the weight, and since it is built from differentiable ops it is itself
    differentiable in the incoming gradient: double backward is exact.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, spectrum: Tensor, shape: tuple[int, int]) -> Tensor:
        ctx.kernel_size, ctx.shape, ctx.weight_dtype = weight.shape[-1], shape, weight.dtype
        ctx.spectrum_dtype = spectrum.dtype
        return spectrum.view_as(spectrum)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return kernel_spectrum_adjoint(grad, ctx.kernel_size, ctx.shape).to(ctx.weight_dtype), None, None

    @staticmethod
    def jvp(ctx, weight_t: Tensor | None, *_):
        return kernel_spectrum(weight_t, ctx.shape).to(ctx.spectrum_dtype) if weight_t is not None else None


# --------------------------------------------------------------------------------------------
# Spectra lifetime


class CacheInfo(NamedTuple):
    """Spectrum cache counters: ``misses`` = spectra computed, ``hits`` = spectra reused."""

    hits: int
    misses: int
    weights: int


_local = threading.local()


def _stack(name: str) -> list:
    """This thread's stack of open scopes (``"scopes"``) or transform memos (``"memos"``)."""
    stack = getattr(_local, name, None)
    if stack is None:
        stack = []
        setattr(_local, name, stack)
    return stack


def _active_scope() -> "SpectraScope | None":
    stack = _stack("scopes")
    return stack[-1] if stack else None


class SpectraScope:
    """The kernel spectra of one computation with fixed weights (``fixed_point`` opens one per
    call): each weight's spectrum is computed once in the scope, used by every conv the scope
    covers without further checks, and dropped by :meth:`close` (or with the scope).

    A scope may be entered again later, on any thread (``fixed_point`` re-enters its scope in
    the backward, for the adjoint products), and nests: the innermost open one serves.

    Example:
        >>> scope = SpectraScope()
        >>> with scope:
        ...     for _ in range(10):
        ...         h = cell(x, h)
        >>> scope.close()
    """

    def __init__(self):
        # key -> (weight ref, spectrum, autograd node of the spectrum or None)
        self._pinned: dict[tuple, list] = {}
        self.closed = False

    def __enter__(self) -> "SpectraScope":
        if self.closed:
            raise RuntimeError("SpectraScope: this scope was closed; open a new one")
        _stack("scopes").append(self)
        return self

    def __exit__(self, *exc) -> None:
        _stack("scopes").remove(self)

    def close(self) -> None:
        """Drop every pinned spectrum (the scope cannot be entered again)."""
        self._pinned.clear()
        self.closed = True

    def __len__(self) -> int:
        return len(self._pinned)


def _active_memo() -> "_TransformMemo | None":
    stack = _stack("memos")
    return stack[-1] if stack else None


class _TransformMemo:
    """For this package's explicit backward passes (:mod:`crbp_fast.hgru.tracked`): the rfft2
    of every conv input transformed while the memo is active (outside autograd and tracing),
    for :meth:`FFTConv.weight_grad` to reuse instead of transforming the same tensor again.

    An entry is used only for the same tensor object with the same data pointer, shape,
    strides and version counter. The version catches torch's in-place ops and the native
    kernels' ``out=`` writes (they bump it); it cannot see writes through ``.data`` or a numpy
    view, so the memo is only given tensors the package itself made and does not write that way
    (the tracked step's intermediates). Entered like :class:`SpectraScope` (re-entrant, any
    thread, the innermost serves); :meth:`close` drops what it holds.
    """

    def __init__(self):
        # (id(t), shape, dtype) -> (weak ref of t, (data_ptr, shape, strides, version), rfft2)
        self._entries: dict[tuple, tuple] = {}
        self.hits = 0

    def __enter__(self) -> "_TransformMemo":
        _stack("memos").append(self)
        return self

    def __exit__(self, *exc) -> None:
        _stack("memos").remove(self)

    def close(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _stamp(t: Tensor) -> tuple:
        return t.data_ptr(), tuple(t.shape), t.stride(), t._version

    def get(self, t: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor | None:
        if t.is_inference():
            return None
        entry = self._entries.get((id(t), shape, dtype))
        if entry is None or entry[0]() is not t or entry[1] != self._stamp(t):
            return None
        self.hits += 1
        return entry[2]

    def put(self, t: Tensor, shape: tuple[int, int], dtype: torch.dtype, z: Tensor) -> None:
        if t.is_inference():
            return
        key, memo = (id(t), shape, dtype), weakref.ref(self)

        def drop(ref, key=key, memo=memo):  # a dead tensor's transform goes with it
            owner = memo()
            if owner is not None:
                entry = owner._entries.get(key)
                if entry is not None and entry[0] is ref:
                    owner._entries.pop(key, None)

        self._entries[key] = (weakref.ref(t, drop), self._stamp(t), z)

    def items(self) -> list[tuple[Tensor, tuple[int, int], torch.dtype, Tensor]]:
        """(tensor, FFT size, dtype, transform) of every entry whose tensor is alive."""
        out = []
        for (_, shape, dtype), (ref, _, z) in list(self._entries.items()):
            t = ref()
            if t is not None:
                out.append((t, shape, dtype, z))
        return out

    def transform(self, t: Tensor, tc: Tensor, shape: tuple[int, int]) -> Tensor:
        """rfft2 of ``tc`` (``t`` in the compute dtype, contiguous) at ``shape``, from the memo
        when ``t`` is there unchanged, else computed and kept."""
        z = self.get(t, shape, tc.dtype)
        if z is None:
            z = torch.fft.rfft2(tc, s=shape)
            self.put(t, shape, tc.dtype, z)
        return z


class _Entry:
    __slots__ = ("snapshot", "spectra")

    def __init__(self, snapshot: Tensor):
        self.snapshot = snapshot
        self.spectra: OrderedDict[tuple, Tensor] = OrderedDict()


def _check_tensor(arg: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _REAL_DTYPES:
        raise TypeError(
            f"{arg}: expected a real floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() != 4:
        raise ValueError(f"{arg}: expected a 4-d tensor, got shape {tuple(t.shape)}")


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def _same_values(snapshot: Tensor, weight: Tensor) -> bool:
    """Bitwise equality of a weight with its copy. On CPU numpy compares (one thread): an ATen
    op over the 140K values of a C = 25, k = 15 kernel is an OpenMP region, which on a loaded
    machine waits ~10 ms for a descheduled second thread."""
    if snapshot.shape != weight.shape or snapshot.dtype != weight.dtype or snapshot.device != weight.device:
        return False
    if weight.device.type == "cpu" and weight.dtype in _NUMPY_DTYPES:
        a = snapshot.view(torch.int16 if weight.dtype == torch.float16 else
                          torch.int32 if weight.dtype == torch.float32 else torch.int64)
        b = weight.contiguous().view(a.dtype)
        return bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(snapshot, weight)


class FFTConv:
    """The ``"fft"`` convolution engine: :meth:`conv` = ``F.conv2d(x, w, padding=k // 2)`` and
    :meth:`conv_transpose` = its adjoint in the input, through FFTs with cached kernel spectra.

    Example:
        >>> engine = FFTConv()
        >>> y = engine.conv(torch.randn(2, 8, 40, 40), torch.randn(8, 8, 15, 15))
    """

    name = "fft"

    def __init__(self):
        self._cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # base spectrum -> its mix_layout, living exactly as long as the spectrum it was made from
        self._layouts: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._hits = 0
        self._misses = 0

    def conv(self, x: Tensor, weight: Tensor) -> Tensor:
        """'same' cross-correlation, (B, C, H, W) x (O, C, k, k) -> (B, O, H, W).

        Differentiable in ``x`` and ``weight`` (double backward included). The result has the
        dtype of ``x`` and ``weight`` (promoted if they differ), or the autocast dtype under
        autocast; half precisions are computed in float32.
        """
        return self._run("x", x, weight, transpose=False)

    def conv_transpose(self, y: Tensor, weight: Tensor) -> Tensor:
        """Adjoint of :meth:`conv` in its input, (B, O, H, W) x (O, C, k, k) -> (B, C, H, W):
        correlation with the flipped, channel-transposed kernel, from the same spectrum."""
        return self._run("y", y, weight, transpose=True)

    def weight_grad(self, x: Tensor | Sequence[Tensor], dy: Tensor | Sequence[Tensor], kernel_size: int) -> Tensor:
        """d/dw of sum(dy * conv(x, w)) for a k x k kernel, (B, C, H, W), (B, O, H, W) -> (O, C, k, k):
        the spectrum gradient mapped back to the taps (differentiable). Tuples x = (x_1, ...),
        dy = (dy_1, ...) give the sum over the pairs (one spectrum product and one map back);
        inside the explicit backward's transform memo their transforms come from it where it has them."""
        if isinstance(x, Tensor) and isinstance(dy, Tensor):
            pairs = ((x,), (dy,))
        elif isinstance(x, (tuple, list)) and isinstance(dy, (tuple, list)) and len(x) == len(dy) and len(x):
            pairs = (tuple(x), tuple(dy))
        elif isinstance(x, (Tensor, tuple, list)) and isinstance(dy, (Tensor, tuple, list)):
            raise ValueError(f"x, dy: expected two tensors or two tuples of tensors of one non-zero length, got "
                             f"{_describe(x)} and {_describe(dy)}")
        else:
            _check_tensor("x", x)
            _check_tensor("dy", dy)
        first = pairs[0][0]
        for i, (xi, gi) in enumerate(zip(*pairs)):
            _check_tensor("x" if len(pairs[0]) == 1 else f"x[{i}]", xi)
            _check_tensor("dy" if len(pairs[0]) == 1 else f"dy[{i}]", gi)
            if xi.shape[1:] != first.shape[1:] or xi.device != first.device:
                raise ValueError(f"x[{i}]: expected the channels, image size and device of x[0] "
                                 f"{tuple(first.shape)} on {first.device}, got {tuple(xi.shape)} on {xi.device}")
            if xi.shape[0] != gi.shape[0] or xi.shape[2:] != gi.shape[2:] or gi.device != xi.device \
                    or gi.shape[1] != pairs[1][0].shape[1]:
                name = "dy" if len(pairs[0]) == 1 else f"dy[{i}]"
                raise ValueError(f"{name}: expected the batch, image size and device of x {tuple(xi.shape)} "
                                 f"and the channels of dy[0], got {tuple(gi.shape)} on {gi.device}")
        dtypes = [t.dtype for t in pairs[0] + pairs[1]]
        dtype, out_dtype = compute_dtype(*dtypes), functools.reduce(torch.promote_types, dtypes)
        shape = fft_shape(first.shape[2], first.shape[3], kernel_size)
        xs = tuple(t.to(dtype).contiguous() for t in pairs[0])
        gs = tuple(t.to(dtype).contiguous() for t in pairs[1])
        kernel = _mix_kernel(first.device, dtype)
        if kernel is not None and not any(_tracked(t) for t in xs + gs):
            # Outside autograd the fused outer product: the batched matmul runs one tiny
            # (2C x 2B) x (2B x O) product per frequency (65 against ~15 ms at B2-C25-160x81).
            memo = _active_memo()
            transform = memo.transform if memo is not None else (lambda _, tc, s: torch.fft.rfft2(tc, s=s))
            with torch.no_grad():
                zx = [transform(t, tc, shape) for t, tc in zip(pairs[0], xs)]
                zg = [transform(t, tc, shape) for t, tc in zip(pairs[1], gs)]
                grad = _fused_spectrum_gradient(_cat(zx), _cat(zg), shape, kernel)
        else:
            xc, gc = (xs[0], gs[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(gs))
            grad = spectrum_gradient(xc, gc, shape)
        return kernel_spectrum_adjoint(grad, kernel_size, shape).to(out_dtype)

    def transform_memo(self) -> _TransformMemo:
        """A new transform memo, for this package's explicit backward passes (:class:`_TransformMemo`)."""
        return _TransformMemo()

    def spectrum(self, weight: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """The spectrum of ``weight``'s current values at FFT size ``shape`` in ``dtype`` (no graph):
        the active scope's, else a cached one if the weight still equals its copy, else computed."""
        return self._lookup(weight, shape, dtype, track=False)[0]

    def _layout(self, base: Tensor, shape: tuple[int, int]) -> Tensor:
        """:func:`mix_layout` of a cached or pinned spectrum, made once per spectrum."""
        layout = self._layouts.get(base)
        if layout is None:
            with torch.inference_mode(False), torch.no_grad():
                layout = self._layouts[base] = mix_layout(base, shape)
        return layout

    def _compute(self, weight: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        self._misses += 1
        # Under inference_mode the spectrum would become an inference tensor, which a later
        # tracked step could not save for backward: compute it as a normal tensor.
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            return kernel_spectrum(weight.detach().to(dtype), shape)

    def _cached(self, weight: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        key = (shape, dtype, weight.device)
        values = weight.detach()
        entry = self._cache.get(weight)
        if entry is not None and _same_values(entry.snapshot, values):
            spec = entry.spectra.get(key)
            if spec is not None:
                self._hits += 1
                entry.spectra.move_to_end(key)
                return spec
        else:
            with torch.inference_mode(False):
                entry = _Entry(values.clone())
            self._cache[weight] = entry
        spec = self._compute(weight, shape, dtype)
        entry.spectra[key] = spec
        while len(entry.spectra) > _SIZES_PER_WEIGHT:
            entry.spectra.popitem(last=False)
        return spec

    def _lookup(self, weight: Tensor, shape: tuple[int, int], dtype: torch.dtype,
                track: bool) -> tuple[Tensor, Tensor]:
        """(the spectrum, linked to ``weight`` for autograd when ``track`` (one node per weight
        and scope); the same spectrum without the link)."""
        scope = _active_scope()
        if scope is None:
            spec = self._cached(weight, shape, dtype)
            return (_SpectrumOfWeight.apply(weight, spec, shape) if track else spec), spec
        key = (id(weight), shape, dtype, weight.device)
        pin = scope._pinned.get(key)
        if pin is None or pin[0]() is not weight:
            pin = scope._pinned[key] = [weakref.ref(weight), self._cached(weight, shape, dtype), None]
        else:
            self._hits += 1
        if not track:
            return pin[1], pin[1]
        if pin[2] is None:
            pin[2] = _SpectrumOfWeight.apply(weight, pin[1], shape)
        return pin[2], pin[1]

    def cache_info(self) -> CacheInfo:
        """Hits and misses since the last :meth:`clear_cache`, and the weights held."""
        return CacheInfo(self._hits, self._misses, len(self._cache))

    def clear_cache(self) -> None:
        """Drop every cached spectrum (outside scopes) and reset the counters."""
        self._cache = WeakIdKeyDictionary()
        self._layouts = WeakIdKeyDictionary()
        self._hits = self._misses = 0

    def _run(self, arg: str, x: Tensor, weight: Tensor, transpose: bool) -> Tensor:
        _check_tensor(arg, x)
        _check_tensor("weight", weight)
        out_ch, in_ch, kh, kw = weight.shape
        if kh != kw or kh % 2 == 0:
            raise ValueError(f"weight: expected a square kernel of odd size k x k, got {kh} x {kw}")
        channels = out_ch if transpose else in_ch
        if x.shape[1] != channels:
            dim = "weight.shape[0] (output channels)" if transpose else "weight.shape[1] (input channels)"
            raise ValueError(f"{arg}: expected {channels} channels to match {dim}, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if kh > height or kh > width:
            raise ValueError(
                f"weight: kernel {kh} x {kh} is larger than the {height} x {width} image of {arg}; "
                f"the FFT engine needs k <= H and k <= W (use conv='direct')"
            )
        if x.device != weight.device:
            raise ValueError(f"{arg}: is on device {x.device} but weight is on {weight.device}")
        dtype = compute_dtype(x.dtype, weight.dtype)
        device_type = x.device.type
        # Under autocast a float32 result takes the autocast dtype, as F.conv2d's would; the
        # arithmetic stays in float32 (autocast would otherwise run the mix in half precision).
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        if out_dtype != torch.float64 and torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
        shape = fft_shape(height, width, kh)
        track = torch.is_grad_enabled() and weight.requires_grad
        spec, base = self._lookup(weight, shape, dtype, track)
        with torch.autocast(device_type, enabled=False):
            xc = x.to(dtype).contiguous()
            # Under a tracer plain torch ops only: the extension's mix kernel or a kept transform
            # would be recorded as a constant.
            traced = _traced(xc)
            kernel = None if traced else _mix_kernel(x.device, dtype)
            layout = self._layout(base, shape) if kernel is not None else None
            if (torch.is_grad_enabled() and (track or xc.requires_grad)) or _has_tangent(xc):
                out = _Correlate.apply(xc, spec, shape, transpose, layout, kernel)
            else:
                memo = None if traced else _active_memo()
                with torch.no_grad():
                    z = memo.transform(x, xc, shape) if memo is not None else None
                    out = _Correlate.forward(_NoCtx(), xc, spec, shape, transpose, layout, kernel, z)
        return out.to(out_dtype)


class _NoCtx:
    """Stands in for autograd's ctx when :class:`_Correlate`'s forward runs without a graph."""

    needs_input_grad = (False, False, False, False, False, False, False)

    @staticmethod
    def save_for_backward(*tensors) -> None:
        pass

    save_for_forward = save_for_backward


FFT = FFTConv()

__all__ = [
    "FFT", "CacheInfo", "FFTConv", "SpectraScope", "compute_dtype", "correlate", "fft_shape",
    "kernel_spectrum", "kernel_spectrum_adjoint", "mix_layout", "smooth_size", "spectral_mix", "spectrum_gradient",
]
