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
W + p. (H + k - 1 is the size of the full linear convolution; the 'same' crop needs only
H + p: 160 instead of 168 at H = 150, k = 15, 10 % fewer FFT points.) K^ itself is never
padded and FFT'd: only k x k taps are non-zero, so it is two small DFT matmuls
(:func:`kernel_spectrum`).

Channel mix. Per frequency f it is a (B x C) by (C x O) complex product. On CPU a complex
``bmm`` measured 6-12x slower than the same product in real arithmetic, so the spectrum is
stored in real block form: for K^ = a + ib the (2C x 2O) matrix of 2x2 blocks [[a, b], [-b, a]],
which maps an interleaved row [Re x^, Im x^] to [Re y^, Im y^]. The mix is then one real batched
matmul over the F = M (N / 2 + 1) frequencies, ``(F, B, 2C) @ (F, 2C, 2O)``; the adjoint is the
transposed block matrix (the real form of the conjugate transpose), read from the same buffer.
(Storing [a; b] only, (F, 2C, O), halves the memory but needs a 4x larger input and a combining
pass; per conv it measured as fast or up to 30 % slower.) :func:`channel_mix` is the one place where the mix
happens, so a fused (e.g. Triton) mix can be compared against ``bmm`` there.

Spectra cache. Within a training iteration the kernels do not change across the N forward
steps and the adjoint iterations, so :class:`FFTConv` computes each weight's block spectrum once
and keeps it, keyed on the weight tensor's identity (weakly: the entry dies with the tensor) and
its ``_version`` counter (bumped by every in-place change: optimizer steps, ``copy_``,
``load_state_dict``), plus the FFT size, compute dtype, device and storage pointer. Writes
through ``weight.data`` bypass the version counter: call :meth:`FFTConv.clear_cache` after them.
An entry holds F (2C)(2O) values per FFT size (130 MB in float32 at C = 25, 150 x 150).

Autograd. The spectrum enters the graph through :class:`_SpectrumOfWeight`, which returns the
cached tensor in the forward and applies the exact adjoint of the (linear) weight -> spectrum map
in the backward; the rest (rfft2, real matmul, irfft2, crop) is ordinary autograd through
``torch.fft``. So the input gradient reuses the cached spectrum, the weight gradient is exact,
autograd skips the weight branch when only the input gradient is asked for (the adjoint loop),
and double backward (the LCP penalty, ``create_graph=True``) works because every backward is
made of differentiable ops.

float16 / bfloat16 inputs are computed in float32 and the result cast back; float64 stays
float64; under autocast the result takes the autocast dtype, as ``F.conv2d``'s does. The same
code runs on CUDA (cuFFT through ``torch.fft``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: FFT sizes kept per weight (different image sizes); the least recently used goes first.
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


def kernel_spectrum(weight: Tensor, shape: tuple[int, int]) -> Tensor:
    """Block spectrum of ``weight`` (O, C, k, k) at FFT size ``shape``: (F, 2C, 2O), F = M (N/2 + 1).

    Row 2c + s, column 2o + t hold the 2x2 block [[a, b], [-b, a]] of K^[o, c] = a + ib at each
    frequency (module docstring), in ``weight``'s dtype. K^ = A w Bv^T per (o, c) (the factors
    of :func:`_dft_factors`): the k x k kernel is transformed by two real matmuls instead of
    being padded to M x N for O C FFTs (2x faster at C = 25, k = 15, 160 x 160; the cost is
    writing the F (2C)(2O) result, 130 MB in float32 there).
    """
    out_ch, in_ch, k, _ = weight.shape
    m, n = shape
    nh = n // 2 + 1
    a_fac, b_fac = _dft_factors(k, shape, weight.dtype, weight.device)
    # Along j: R[o, c, i, v] = sum_j w[o, c, i, j] Bv[v, j], real and imaginary parts.
    rows = torch.matmul(weight.reshape(-1, k), b_fac.transpose(1, 2))  # (2, O C k, Nh)
    rows = rows.reshape(2, out_ch, in_ch, k, nh).permute(0, 3, 4, 2, 1).reshape(2 * k, nh * in_ch * out_ch)
    # Along i: K^ = A R, as the real matmul [[Ar, -Ai], [Ai, Ar]] @ [Rr; Ri].
    ar, ai = a_fac[0], a_fac[1]
    lhs = torch.cat((torch.cat((ar, -ai), 1), torch.cat((ai, ar), 1)), 0)  # (2M, 2k)
    spec = (lhs @ rows).reshape(2, m, nh, in_ch, out_ch)  # [Re; Im] of K^, (M, Nh, C, O) each
    re, im = spec[0], spec[1]
    blocks = weight.new_empty(m, nh, in_ch, 2, out_ch, 2)  # (M, Nh, C, s, O, t), all written below
    blocks[:, :, :, 0, :, 0] = re
    blocks[:, :, :, 0, :, 1] = im
    blocks[:, :, :, 1, :, 0] = -im
    blocks[:, :, :, 1, :, 1] = re
    return blocks.reshape(m * nh, 2 * in_ch, 2 * out_ch)


def kernel_spectrum_adjoint(grad: Tensor, kernel_size: int, shape: tuple[int, int]) -> Tensor:
    """The adjoint of :func:`kernel_spectrum`: (F, 2C, 2O) -> (O, C, k, k), by differentiable ops.

    With g = dL/da + i dL/db per frequency (a, b the real and imaginary parts of K^), the
    gradient of the kernel is dw[i, j] = Re sum_{u, v <= N/2} conj(A[u, i]) g[u, v] conj(Bv[v, j]),
    two small matmuls per (o, c) (only the k x k taps of the M x N inverse transform are needed).
    """
    m, n = shape
    nh = n // 2 + 1
    k = kernel_size
    in_ch, out_ch = grad.shape[1] // 2, grad.shape[2] // 2
    g = grad.reshape(m, nh, in_ch, 2, out_ch, 2)
    ga = (g[:, :, :, 0, :, 0] + g[:, :, :, 1, :, 1]).reshape(m, -1)  # (M, Nh C O)
    gb = (g[:, :, :, 0, :, 1] - g[:, :, :, 1, :, 0]).reshape(m, -1)
    a_fac, b_fac = _dft_factors(k, shape, grad.dtype, grad.device)
    ar_t, ai_t = a_fac[0].T, a_fac[1].T  # (k, M)
    # Along u: T = A^H g, [Tr; Ti] = [Ar^T; -Ai^T] ga + [Ai^T; Ar^T] gb.
    t = torch.cat((ar_t, -ai_t), 0) @ ga + torch.cat((ai_t, ar_t), 0) @ gb  # (2k, Nh C O)
    t = t.reshape(2, k, nh, in_ch * out_ch).transpose(0, 1).reshape(k, 2 * nh, in_ch * out_ch)
    # Along v: dw[i, j] = sum_v Tr[i, v] Bvr[v, j] + Ti[i, v] Bvi[v, j].
    dw = torch.matmul(b_fac.permute(2, 0, 1).reshape(k, 2 * nh), t)  # (k_i, k_j, C O)
    return dw.reshape(k, k, in_ch, out_ch).permute(3, 2, 0, 1)


def channel_mix(rows: Tensor, spectrum: Tensor, transpose: bool) -> Tensor:
    """Per frequency: (F, B, 2C) @ (F, 2C, 2O) -> (F, B, 2O), or with ``transpose`` the adjoint
    (F, B, 2O) @ (F, 2O, 2C) -> (F, B, 2C) from the same spectrum buffer.

    The one place where the channel mix runs (a fused GPU mix would be compared against ``bmm``
    here)."""
    if transpose:
        # (K @ rows^T)^T reads the spectrum in its stored layout; on CPU it measured as fast as
        # or faster than rows @ K^T.
        return torch.bmm(spectrum, rows.mT).mT
    return torch.bmm(rows, spectrum)


def correlate(x: Tensor, spectrum: Tensor, shape: tuple[int, int], transpose: bool = False) -> Tensor:
    """'same' correlation of ``x`` (B, C, H, W) with the kernel whose block spectrum is given
    (or its adjoint with ``transpose``), via rfft2 -> :func:`channel_mix` -> irfft2 -> crop.
    ``x`` and ``spectrum`` must share a float32 or float64 dtype; the result is contiguous."""
    b, c, h, w = x.shape
    m, n = shape
    nh = n // 2 + 1
    spec = torch.fft.rfft2(x, s=(m, n))  # (B, C, M, Nh)
    rows = torch.view_as_real(spec.permute(2, 3, 0, 1)).reshape(m * nh, b, 2 * c)
    mixed = channel_mix(rows, spectrum, transpose)
    out_ch = mixed.shape[-1] // 2
    out = torch.view_as_complex(mixed.contiguous().view(m, nh, b, out_ch, 2)).permute(2, 3, 0, 1)
    return torch.fft.irfft2(out, s=(m, n))[..., :h, :w].contiguous()


class _SpectrumOfWeight(torch.autograd.Function):
    """Identity on the cached spectrum in the forward, linking it to ``weight`` for autograd.

    The weight -> spectrum map is linear, so its backward (:func:`kernel_spectrum_adjoint`) does
    not depend on the weight, and since it is built from differentiable ops it is itself
    differentiable in the incoming gradient: double backward is exact.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, spectrum: Tensor, shape: tuple[int, int]) -> Tensor:
        ctx.kernel_size, ctx.shape, ctx.weight_dtype = weight.shape[-1], shape, weight.dtype
        return spectrum.view_as(spectrum)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return kernel_spectrum_adjoint(grad, ctx.kernel_size, ctx.shape).to(ctx.weight_dtype), None, None


class CacheInfo(NamedTuple):
    """Spectrum cache counters: ``misses`` = spectra computed, ``hits`` = spectra reused."""

    hits: int
    misses: int
    weights: int


class _Entry:
    __slots__ = ("version", "spectra")

    def __init__(self, version: int):
        self.version = version
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
        correlation with the flipped, channel-transposed kernel, from the same cached spectrum."""
        return self._run("y", y, weight, transpose=True)

    def spectrum(self, weight: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """The block spectrum of ``weight`` at FFT size ``shape`` in ``dtype``, cached (no graph)."""
        if weight.is_inference():  # inference tensors have no version counter: never cache them
            self._misses += 1
            with torch.no_grad():
                return kernel_spectrum(weight.detach().to(dtype), shape)
        entry = self._cache.get(weight)
        if entry is None or entry.version != weight._version:
            entry = _Entry(weight._version)
            self._cache[weight] = entry
        key = (shape, dtype, weight.device, weight.dtype, weight.data_ptr())
        spec = entry.spectra.get(key)
        if spec is not None:
            self._hits += 1
            entry.spectra.move_to_end(key)
            return spec
        self._misses += 1
        # Under inference_mode the spectrum would become an inference tensor, which a later
        # tracked step could not save for backward: compute it as a normal tensor.
        with torch.inference_mode(False), torch.no_grad():
            spec = kernel_spectrum(weight.detach().to(dtype), shape)
        entry.spectra[key] = spec
        while len(entry.spectra) > _SIZES_PER_WEIGHT:
            entry.spectra.popitem(last=False)
        return spec

    def cache_info(self) -> CacheInfo:
        """Hits and misses since the last :meth:`clear_cache`, and the weights held."""
        return CacheInfo(self._hits, self._misses, len(self._cache))

    def clear_cache(self) -> None:
        """Drop every cached spectrum and reset the counters (needed only after writes
        through ``weight.data``, which the version counter does not see)."""
        self._cache = WeakIdKeyDictionary()
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
        spec = self.spectrum(weight, shape, dtype)
        with torch.autocast(device_type, enabled=False):
            if torch.is_grad_enabled() and weight.requires_grad:
                spec = _SpectrumOfWeight.apply(weight, spec, shape)
            out = correlate(x.to(dtype), spec, shape, transpose)
        return out.to(out_dtype)


FFT = FFTConv()

__all__ = [
    "FFT", "CacheInfo", "FFTConv", "channel_mix", "compute_dtype", "correlate", "fft_shape",
    "kernel_spectrum", "kernel_spectrum_adjoint", "smooth_size",
]
