"""Horizontal convolution engines: 'same' cross-correlation and its transpose.

An engine has ``name``, ``conv(x, weight)`` (differentiable in both),
``conv_transpose(y, weight)`` (the adjoint in the input, used by VJPs) and
``weight_grad(x, dy, k)`` (the gradient in the weight, used by the tracked step's explicit backward). Two exist:

- ``"direct"``: ``F.conv2d`` (oneDNN on CPU, cuDNN on CUDA);
- ``"fft"``: :class:`crbp_fast.conv.fft.FFTConv`, FFTs with cached kernel spectra.

``resolve_conv(name, x, kernel_size)`` maps a cell's ``conv=`` option to an engine. ``"auto"``
picks, per (device, dtype, B, C, H, W, k), as follows, and remembers the pick for the process:

1. The environment variable ``CRBP_FAST_CONV`` (``direct``, ``fft`` or ``auto``), if set,
   overrides ``conv="auto"`` (an explicit ``conv="direct"``/``"fft"`` always wins); ``fft``
   there still gives ``direct`` where the FFT engine does not apply (k > H or k > W).
2. ``fft`` is impossible when k > H or k > W, and pointless for k = 1: ``direct``.
3. A cost model predicts both times: direct = 2 B C^2 H W k^2 flops at a sustained conv rate
   plus a call overhead; fft = the forward and inverse transforms of B C planes of M x N points
   (~2.5 M N log2(M N) flops each) at an FFT rate, the channel mix (8 F B C^2 flops,
   F = M (N/2 + 1)) at a matmul rate, streaming the F (2C) C spectrum and four layout passes
   over the B C F complex values at memory bandwidth, plus a per-call overhead. The CPU rates
   (``_RATES``) are fitted to the engines as they are, timed interleaved on the 2-core
   development CPU; the CUDA entries are rough.
4. Where the model predicts one engine ``MODEL_MARGIN`` (3x) faster than the other, it decides
   alone: its errors measured within 2.5x, and a timing probe on a loaded machine is not
   (a probe once picked direct at B4-C25-64x64-k15, where fft is 5x faster). So the choice there
   is the same in every run. Only inside the margin, near the crossover, both engines are timed,
   interleaved (a warm-up each, then up to five rounds within ~1 s, medians), and the measured
   winner replaces the model's pick only if it is faster by ``MEASURED_MARGIN`` (20 %); an
   engine whose predicted time does not fit the budget is not run.

The picks are in :func:`auto_choices`; ``logging.getLogger("crbp_fast")`` logs each at INFO.
Inside the margin both engines take about the same time, and a pick may differ between
processes there; set ``CRBP_FAST_CONV`` to pin it.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from .fft import FFT, FFTConv, fft_shape
from ..hgru import reference

log = logging.getLogger("crbp_fast")

CONV_NAMES = ("auto", "direct", "fft")
ENV_VAR = "CRBP_FAST_CONV"
#: Wall-clock budget of the one-time measurement of a new shape, in seconds.
MEASURE_BUDGET_S = 1.0
#: The model decides alone when it predicts one engine this many times faster than the other.
MODEL_MARGIN = 3.0
#: Inside the model's margin, a measured winner must be this much faster to override the model.
MEASURED_MARGIN = 1.2


class ConvEngine(Protocol):
    """What a cell needs from an engine: the 'same' correlation and its adjoint in the input."""

    name: str

    def conv(self, x: Tensor, weight: Tensor) -> Tensor: ...

    def conv_transpose(self, y: Tensor, weight: Tensor) -> Tensor: ...

    def weight_grad(self, x: Tensor | Sequence[Tensor], dy: Tensor | Sequence[Tensor], kernel_size: int) -> Tensor:
        """d/dw of sum(dy * conv(x, w)); tuples of tensors give the sum over the pairs."""
        ...


class DirectConv:
    """``F.conv2d`` with 'same' zero padding (cuDNN / oneDNN)."""

    name = "direct"

    def conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return reference.conv_same(x, weight)

    def conv_transpose(self, y: Tensor, weight: Tensor) -> Tensor:
        return reference.conv_same_transpose(y, weight)

    def weight_grad(self, x: Tensor | Sequence[Tensor], dy: Tensor | Sequence[Tensor], kernel_size: int) -> Tensor:
        """d/dw of sum(dy * conv(x, w)) for a k x k kernel: (O, C, k, k); tuples x = (x_1, ...),
        dy = (dy_1, ...) give the sum over the pairs."""
        return reference.conv_same_weight_grad(x, dy, kernel_size)


DIRECT = DirectConv()
ENGINES: dict[str, ConvEngine] = {"direct": DIRECT, "fft": FFT}


@dataclass(frozen=True)
class _Rates:
    direct_flops: float  # sustained direct-conv flop/s for k <= 5
    direct_flops_large_k: float  # the same for k > 5
    direct_overhead_s: float  # fixed cost of one direct conv call
    fft_flops: float  # flop/s of batched real 2-d FFTs
    mix_flops: float  # flop/s of the batched real matmul
    bandwidth: float  # bytes/s for streaming the spectrum and the layout passes
    fft_overhead_s: float  # fixed cost of one FFT conv call (dispatch, small copies)


# CPU: fitted to 10 shapes (B in {1, 2, 4}, C in {4, 8, 25}, H = W in {16, ..., 150}, k in
# {3, 5, 7, 9, 15}) timed interleaved on one thread of the shared 2-core development machine
# (oneDNN direct sustains 65-100 Gflop/s there); predicted within 2.5x for both engines, the
# pick right on every shape outside the 3x margin.
_RATES = {
    "cpu": _Rates(8e10, 6.5e10, 2e-5, fft_flops=8e9, mix_flops=2e10, bandwidth=1e10, fft_overhead_s=1.5e-4),
    "cuda": _Rates(2e13, 2e13, 1e-5, fft_flops=2e12, mix_flops=2e13, bandwidth=2e12, fft_overhead_s=1e-4),
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
    direct = scale * 2.0 * b * c * c * h * w * k * k / direct_rate + rates.direct_overhead_s
    m, n = fft_shape(h, w, k)
    freqs = m * (n // 2 + 1)
    ffts = 2 * b * c * 2.5 * m * n * math.log2(max(m * n, 2)) / rates.fft_flops
    mix = 8.0 * freqs * b * c * c / rates.mix_flops
    # The spectrum (F x 2C x C reals) is read once; the layout passes move ~4 x B C F complex values.
    memory = (freqs * 2 * c * c + 4 * 2 * b * c * freqs) * 4 / rates.bandwidth
    return direct, scale * (ffts + mix + memory) + rates.fft_overhead_s


def _measure(x: Tensor, kernel_size: int, predicted: dict[str, float]) -> dict[str, float]:
    """Median seconds per conv of each engine on random data of the shape of ``x``, timed
    interleaved (a warm-up each, then rounds of one call per engine, up to five, within the
    budget), so that a load that comes and goes hits both alike. An engine whose predicted time
    does not fit the budget is left out. The FFT engine is a private one, so the measurement
    leaves the shared spectrum cache alone."""
    device, dtype = x.device, x.dtype
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG state alone
    c = x.shape[1]
    data = torch.rand(x.shape, generator=gen, device=device, dtype=dtype)
    weight = torch.rand((c, c, kernel_size, kernel_size), generator=gen, device=device, dtype=dtype)
    engines: dict[str, ConvEngine] = {"direct": DIRECT, "fft": FFTConv()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    names = [n for n in sorted(predicted, key=predicted.get) if 2 * predicted[n] <= MEASURE_BUDGET_S]
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for round_ in range(6):
            for name in names:
                t0 = time.perf_counter()
                engines[name].conv(data, weight)
                sync()
                if round_ > 0:  # round 0 warms up
                    samples[name].append(time.perf_counter() - t0)
            spent = time.perf_counter() - start
            if round_ > 0 and spent * (round_ + 2) / (round_ + 1) > MEASURE_BUDGET_S:
                break
    return {n: statistics.median(t) for n, t in samples.items() if t}


def auto_choice(x: Tensor, kernel_size: int) -> AutoChoice:
    """The ``conv="auto"`` decision for the shape, device and dtype of ``x`` (cached per process)."""
    b, c, h, w = x.shape
    key = (x.device, x.dtype, b, c, h, w, kernel_size)
    choice = _choices.get(key)
    if choice is not None:
        return choice
    p_direct, p_fft = predict_times(x.device.type, x.dtype, (b, c, h, w), kernel_size)
    modelled = "fft" if p_fft < p_direct else "direct"
    if kernel_size == 1 or not fft_applicable(x, kernel_size):
        why = "k = 1" if kernel_size == 1 else f"kernel {kernel_size} larger than the {h} x {w} image"
        choice = AutoChoice("direct", p_direct, p_fft, None, None, f"{why}: fft not used")
    elif max(p_direct, p_fft) >= MODEL_MARGIN * min(p_direct, p_fft):
        ratio = max(p_direct, p_fft) / min(p_direct, p_fft)
        choice = AutoChoice(modelled, p_direct, p_fft, None, None, f"cost model: {ratio:.1f}x apart")
    else:
        measured = _measure(x, kernel_size, {"direct": p_direct, "fft": p_fft})
        engine, how = modelled, "cost model (within its margin; not measured)"
        if len(measured) == 2:
            fast, slow = sorted(measured, key=measured.get)
            if measured[slow] >= MEASURED_MARGIN * measured[fast]:
                engine, how = fast, "measured"
            else:
                how = f"cost model (measured within {MEASURED_MARGIN:.1f}x)"
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
    "CONV_NAMES", "DIRECT", "ENGINES", "ENV_VAR", "FFT", "MEASURED_MARGIN", "MODEL_MARGIN", "AutoChoice", "ConvEngine", "DirectConv",
    "FFTConv", "auto_choice", "auto_choices", "check_conv_name", "fft_applicable", "predict_times",
    "resolve_conv",
]
