"""Horizontal convolution engines: 'same' cross-correlation and its transpose.

An engine has ``name``, ``conv(x, weight)`` (differentiable in both) and
``conv_transpose(y, weight)`` (the adjoint in the input, used by VJPs). Two exist:

- ``"direct"``: ``F.conv2d`` (oneDNN on CPU, cuDNN on CUDA);
- ``"fft"``: :class:`crbp_fast.fft_conv.FFTConv`, FFTs with cached kernel spectra.

``resolve_conv(name, x, kernel_size)`` maps a cell's ``conv=`` option to an engine. ``"auto"``
picks, per (device, dtype, B, C, H, W, k), as follows, and remembers the pick for the process:

1. The environment variable ``CRBP_FAST_CONV`` (``direct``, ``fft`` or ``auto``), if set,
   overrides ``conv="auto"`` (an explicit ``conv="direct"``/``"fft"`` always wins); ``fft``
   there still gives ``direct`` where the FFT engine does not apply (k > H or k > W).
2. ``fft`` is impossible when k > H or k > W, and pointless for k = 1: ``direct``.
3. A cost model predicts both times: direct = 2 B C^2 H W k^2 flops at a sustained conv rate
   (lower for k > 5, where oneDNN leaves its specialised small-kernel code);
   fft = the rfft2 and irfft2 of 2 B C planes of M x N points (~2.5 M N log2(M N) flops each)
   at an FFT rate, plus the channel mix (8 F B C^2 flops, F = M (N/2 + 1), and reading the
   F (2C)^2 spectrum) at a matmul rate and memory bandwidth, plus a per-call overhead.
   The rates (``_RATES``) are set from measurements on the 2-core development CPU; the CUDA
   entries are rough and only order the measurement, which decides there.
4. The model is checked by one measurement: each engine is timed on random data of the shape
   (the cheaper-predicted first; a warm-up call, then up to three timed calls, the minimum
   kept), within a budget of ~1 s per new shape: an engine whose predicted time does not fit the
   budget left is not run, and its predicted time stands in. The faster time wins.

The picks are in :func:`auto_choices`; ``logging.getLogger("crbp_fast")`` logs each at INFO.
Near the crossover both engines take about the same time, and timing noise may make two
processes pick differently there; set ``CRBP_FAST_CONV`` to pin the choice.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .fft_conv import FFT, FFTConv, fft_shape
from .hgru import reference

log = logging.getLogger("crbp_fast")

CONV_NAMES = ("auto", "direct", "fft")
ENV_VAR = "CRBP_FAST_CONV"
#: Wall-clock budget of the one-time measurement of a new shape, in seconds.
MEASURE_BUDGET_S = 1.0


class ConvEngine(Protocol):
    """What a cell needs from an engine: the 'same' correlation and its adjoint in the input."""

    name: str

    def conv(self, x: Tensor, weight: Tensor) -> Tensor: ...

    def conv_transpose(self, y: Tensor, weight: Tensor) -> Tensor: ...


class DirectConv:
    """``F.conv2d`` with 'same' zero padding (cuDNN / oneDNN)."""

    name = "direct"

    def conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return reference.conv_same(x, weight)

    def conv_transpose(self, y: Tensor, weight: Tensor) -> Tensor:
        return reference.conv_same_transpose(y, weight)


DIRECT = DirectConv()
ENGINES: dict[str, ConvEngine] = {"direct": DIRECT, "fft": FFT}


@dataclass(frozen=True)
class _Rates:
    direct_flops: float  # sustained direct-conv flop/s for k <= 5
    direct_flops_large_k: float  # the same for k > 5 (oneDNN leaves its small-kernel paths)
    fft_flops: float  # flop/s of batched real 2-d FFTs
    mix_flops: float  # flop/s of the batched real matmul
    bandwidth: float  # bytes/s for streaming the spectrum
    fft_overhead_s: float  # fixed cost of one FFT conv call (dispatch, small copies)


# CPU: fitted to 61 shapes timed on one thread of the shared 2-core development machine
# (B in {1, 4}, C in {4, 25}, H = W in {16, 32, 64, 150}, k in {3, 5, 9, 15}): the FFT time
# within 2x, the direct one within 2.5x except on tiny images with k >= 9 (oneDNN's generic
# path, up to 80x slower); the model's pick matched the measured one on 53 of 61 shapes, the
# rest tiny or within 20 % of the crossover, where the measurement decides.
_RATES = {
    "cpu": _Rates(3e10, 1.5e10, fft_flops=8e9, mix_flops=2e10, bandwidth=5e9, fft_overhead_s=2.5e-4),
    "cuda": _Rates(2e13, 2e13, fft_flops=2e12, mix_flops=2e13, bandwidth=2e12, fft_overhead_s=1e-4),
}


@dataclass(frozen=True)
class AutoChoice:
    """One ``conv="auto"`` decision: the engine, the model's predictions and what was measured
    (seconds per conv; None where the engine was not run)."""

    engine: str
    predicted_direct_s: float
    predicted_fft_s: float
    measured_direct_s: float | None
    measured_fft_s: float | None
    reason: str


_choices: dict[tuple, AutoChoice] = {}


def check_conv_name(name: str) -> str:
    if name not in CONV_NAMES:
        raise ValueError(f"conv: expected one of {CONV_NAMES}, got {name!r}")
    return name


def fft_applicable(x: Tensor, kernel_size: int) -> bool:
    """Whether the FFT engine accepts this input: k <= H and k <= W."""
    return kernel_size <= min(x.shape[-2:])


def predict_times(
    device_type: str, dtype: torch.dtype, shape: tuple[int, int, int, int], kernel_size: int,
) -> tuple[float, float]:
    """The cost model's (direct, fft) seconds for one conv of x (B, C, H, W) with a (C, C, k, k) kernel."""
    rates = _RATES.get(device_type, _RATES["cpu"])
    b, c, h, w = shape
    k = kernel_size
    scale = 2.0 if dtype == torch.float64 else 1.0
    direct_rate = rates.direct_flops if k <= 5 else rates.direct_flops_large_k
    direct = scale * 2.0 * b * c * c * h * w * k * k / direct_rate
    m, n = fft_shape(h, w, k)
    freqs = m * (n // 2 + 1)
    ffts = 2 * b * c * 2.5 * m * n * math.log2(max(m * n, 2)) / rates.fft_flops
    mix = 8.0 * freqs * b * c * c / rates.mix_flops + freqs * 4 * c * c * 4 * scale / rates.bandwidth
    return direct, scale * (ffts + mix) + rates.fft_overhead_s


def _timed(fn, device: torch.device, budget_s: float) -> float:
    """Minimum wall time of ``fn`` over up to three calls after a warm-up, within ``budget_s``
    (a single call, warm-up included, if only one fits)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    times: list[float] = []
    for _ in range(4):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start + times[-1] > budget_s:
            break
    return min(times[1:]) if len(times) > 1 else times[0]


def _measure(x: Tensor, kernel_size: int, predicted: dict[str, float]) -> dict[str, float]:
    """Time each engine on random data of the shape of ``x``, cheaper prediction first (the FFT
    engine is a private one, so the measurement leaves the shared spectrum cache alone)."""
    device, dtype = x.device, x.dtype
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG state alone
    c = x.shape[1]
    data = torch.rand(x.shape, generator=gen, device=device, dtype=dtype)
    weight = torch.rand((c, c, kernel_size, kernel_size), generator=gen, device=device, dtype=dtype)
    engines: dict[str, ConvEngine] = {"direct": DIRECT, "fft": FFTConv()}
    measured: dict[str, float] = {}
    deadline = time.perf_counter() + MEASURE_BUDGET_S
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for name in sorted(predicted, key=predicted.get):
            left = deadline - time.perf_counter()
            if predicted[name] > left:
                continue
            engine = engines[name]
            measured[name] = _timed(lambda: engine.conv(data, weight), device, left)
    return measured


def auto_choice(x: Tensor, kernel_size: int) -> AutoChoice:
    """The ``conv="auto"`` decision for the shape, device and dtype of ``x`` (cached per process)."""
    b, c, h, w = x.shape
    key = (x.device, x.dtype, b, c, h, w, kernel_size)
    choice = _choices.get(key)
    if choice is not None:
        return choice
    p_direct, p_fft = predict_times(x.device.type, x.dtype, (b, c, h, w), kernel_size)
    if kernel_size == 1 or not fft_applicable(x, kernel_size):
        why = "k = 1" if kernel_size == 1 else f"kernel {kernel_size} larger than the {h} x {w} image"
        choice = AutoChoice("direct", p_direct, p_fft, None, None, f"{why}: fft not used")
    else:
        measured = _measure(x, kernel_size, {"direct": p_direct, "fft": p_fft})
        times = {"direct": measured.get("direct", p_direct), "fft": measured.get("fft", p_fft)}
        engine = min(times, key=times.get)
        how = "measured" if len(measured) == 2 else f"measured {sorted(measured)}, predicted the rest"
        choice = AutoChoice(engine, p_direct, p_fft, measured.get("direct"), measured.get("fft"), how)
    _choices[key] = choice
    log.info("conv 'auto' for %s %s x %s, k=%d: %s (%s)", x.device, x.dtype, tuple(x.shape), kernel_size,
             choice.engine, choice.reason)
    return choice


def auto_choices() -> dict[tuple, AutoChoice]:
    """Every ``conv="auto"`` decision of this process, keyed (device, dtype, B, C, H, W, k)."""
    return dict(_choices)


def resolve_conv(name: str, x: Tensor, kernel_size: int) -> ConvEngine:
    """The engine for ``name`` at the shape of ``x``; "auto" picks the fastest for the shape
    (module docstring), unless ``CRBP_FAST_CONV`` names an engine."""
    check_conv_name(name)
    if name != "auto":
        return ENGINES[name]
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env not in CONV_NAMES:
        raise ValueError(f"{ENV_VAR}: expected one of {CONV_NAMES} (or unset), got {env!r}")
    if env == "direct" or (env == "fft" and fft_applicable(x, kernel_size)):
        return ENGINES[env]
    return ENGINES[auto_choice(x, kernel_size).engine]


__all__ = [
    "CONV_NAMES", "DIRECT", "ENGINES", "ENV_VAR", "FFT", "AutoChoice", "ConvEngine", "DirectConv",
    "FFTConv", "auto_choice", "auto_choices", "check_conv_name", "fft_applicable", "predict_times",
    "resolve_conv",
]
