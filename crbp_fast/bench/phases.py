"""One C-RBP / RBP training iteration with its phases broken out, and a roofline for each.

The phases are the work ``fixed_point`` does for ``algorithm="crbp"`` (``"rbp"``: no penalty),
timed as separate calls in one spectra scope, as the engine runs them:

- ``forward``: N - 1 no-grad steps, then the tracked step from the detached h_{N-1}: for a
  cell with ``tracked_step`` (the hGRU), the one node that also computes the LCP's column sums
  1^T J for crbp, as ``fixed_point`` runs it;
- ``penalty``: the backward of 10 x mean(relu(1^T J - 0.9)^2): the node's explicit tangent
  pass (crbp_fast.hgru.tracked), or for other cells a create_graph VJP and the double backward
  of the tracked step through it;
- ``adjoint``: ``cell.linearize`` at h_{N-1} and K Neumann products J^T v (``adjoint_tol=0``);
- ``final_backward``: the backward of the adjoint solution through the tracked step.

Run together (``train_iteration`` in the speed suite) the penalty's backward and the final one
are a single pass; timed apart, the tracked step is differentiated twice, so the sum of the
phases is a little above the fused iteration.

Roofline. :func:`phase_model` counts, per phase, the bytes that cross memory and the flops, from
the structure of the passes (full (B, C, H, W) float32 maps read or written per pass, the
spectrum and the frequency-domain layout passes of each FFT conv, the transforms and the channel
mix; direct conv arithmetic): a model of the work, not a hardware counter. :func:`machine_rates`
measures what the machine does on the same threads: the bandwidth of a 256 MiB copy and the rate
of a float32 GEMM, on CPU the better of the BLAS GEMM and a oneDNN conv (on CUDA: a
device-to-device copy and the matmul). The bound of a phase is
max(bytes / bandwidth, flops / GEMM rate); the bench prints each phase's time against it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..conv import engines as conv_engines
from ..conv.fft import SpectraScope, _mix_kernel, fft_shape
from ..engine.lcp import lcp_from_step
from ..hgru.backends import resolve_backend
from ..hgru.tracked import passes_for
from ..engine.solvers import neumann_adjoint
from .records import Environment, Record
from .setups import PENALTY_WEIGHT, Shape, Sweep, make_cell, make_inputs, synchronize
from .speed import summarize

PHASES = ("forward", "penalty", "adjoint", "final_backward")
PHASE_ALGORITHMS = ("rbp", "crbp")

# Full-map passes per operation (reads + writes of (B, C, H, W) maps), convs aside. Fused
# backends: the native module's count (crbp_fast/hgru/native/hgru.py); the reference composition:
# one pass per elementwise op of reference.step (its autograd backward about twice that).
_MAPS = {
    "fused": {"step": 14, "linearize": 24, "vjp": 30},
    "torch": {"step": 40, "linearize": 40, "vjp": 70},
}
# The tracked step, by the reference's passes or (native backend) by the fused plane passes of
# crbp_fast/hgru/native/tracked.py: its forward 34 (gate 4, inhibition 12, the U2 gate 4,
# excitation and mix 14); the penalty's tangent about 113 (the five passes 8 + 19 + 39 + 26 + 21,
# their 1x1 mixes and pixel outer products included) and the column sums about 39 (counted with
# the penalty); the state-only backward about 55. The reference's counts are the estimates this
# model had before the fused passes (its eager ops move more: the tangent's ~200 ops roughly 500
# maps); autograd's double backward is about as many as the reference.
_TRACKED_FORWARD_MAPS = {"fused": 34, "torch": 40}
_TRACKED_BACKWARD_MAPS = {"fused": 55, "torch": 80}
_PENALTY_MAPS = {"fused": 152, "torch": 240}


@dataclass(frozen=True)
class MachineRates:
    """What the machine sustains: copy bandwidth (bytes/s) and float32 dense rate (flop/s: the GEMM,
    on CPU the better of the GEMM and a oneDNN conv)."""

    bandwidth: float
    gemm_flops: float

    def line(self, device: torch.device) -> str:
        return (f"machine: {self.bandwidth / 1e9:.1f} GB/s copy, {self.gemm_flops / 1e9:.0f} GFLOP/s float32 "
                f"dense ({device}, {torch.get_num_threads()} thread(s))")


def machine_rates(device: torch.device, repeats: int = 5) -> MachineRates:
    """The best of ``repeats`` timings of a 256 MiB copy and of a float32 GEMM on ``device``."""
    n = 64 * 2**20  # float32 values: 256 MiB
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)

    def best(fn: Callable[[], object]) -> float:
        fn()
        synchronize(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    copy_s = best(lambda: dst.copy_(src))
    gemm = 2 * size**3 / best(lambda: torch.mm(a, b))
    if device.type == "cpu":
        # The BLAS GEMM is not always the fastest dense arithmetic on a CPU: on an AMD EPYC (Zen
        # 5) MKL's sgemm ran at 80-90 GFLOP/s while oneDNN's convs (AVX-512) reached 123 (the
        # paper shape's 15x15) and 219 (this one), so that the direct phases had measured 0.8x
        # "the bound". The rate is the better of the two.
        x = torch.randn(1, 64, 96, 96, device=device)
        w = torch.randn(64, 64, 9, 9, device=device)
        conv_flops = 2 * 64 * 64 * 96 * 96 * 81
        gemm = max(gemm, conv_flops / best(lambda: torch.nn.functional.conv2d(x, w, padding=4)))
    return MachineRates(bandwidth=2 * 4 * n / copy_s, gemm_flops=gemm)


def _conv_cost(shape: Shape, conv: str, fused_mix: bool = False) -> tuple[float, float]:
    """(bytes, flops) of one k x k conv (or its transpose, or its weight gradient) of the engine;
    ``fused_mix``: the FFT mix runs as the fused spectral_mix kernel (reads the transform output
    and writes the mix output once: two layout passes instead of six)."""
    b, c, h, w, k = shape.batch, shape.channels, shape.height, shape.width, shape.kernel_size
    map_bytes = 4 * b * c * h * w
    if conv == "direct":
        return 2 * map_bytes + 4 * c * c * k * k, 2.0 * b * c * c * h * w * k * k
    m, n = fft_shape(h, w, k)
    freqs = m * (n // 2 + 1)
    transforms = 2 * b * c * 2.5 * m * n * math.log2(m * n)
    spectrum = 4 * freqs * 2 * c * c
    # transform outputs, doubled rows, mix output, inverse input (fused mix: transform output in, mix out)
    layout = (2 if fused_mix else 6) * 8 * b * c * freqs
    return 2 * map_bytes + spectrum + layout, transforms + 8.0 * freqs * b * c * c


def phase_model(shape: Shape, backend: str, conv: str, algorithm: str, steps: int,
                adjoint_steps: int, fused_mix: bool = False,
                fused_tracked: bool = False) -> dict[str, tuple[float, float]]:
    """(bytes, flops) per phase of one iteration (module docstring): a count of passes, not a
    measurement. ``fused_mix``: the FFT engine's channel mix is the fused kernel
    (crbp_fast.conv.fft: CRBP_FAST_FFT_MIX, native on CPU by default); ``fused_tracked``: the
    tracked step runs a fused backend's plane passes (:mod:`crbp_fast.hgru.plane_tracked`: native
    on CPU, Triton on CUDA with ``CRBP_FAST_CUDA_TRACKED=1``; the same passes, so the same count)."""
    map_bytes = 4 * shape.batch * shape.channels * shape.height * shape.width
    conv_bytes, conv_flops = _conv_cost(shape, conv, fused_mix)
    maps = _MAPS["torch" if backend == "torch" else "fused"]
    tracked = "fused" if fused_tracked else "torch"

    def cost(passes: float, convs: float) -> tuple[float, float]:
        return passes * map_bytes + convs * conv_bytes, convs * conv_flops

    out = {
        "forward": tuple(a + b for a, b in zip(cost(maps["step"] * (steps - 1), 2 * (steps - 1)),
                                                cost(_TRACKED_FORWARD_MAPS[tracked], 2))),
        # Each VJP and the linearisation: two convs; the linearisation's forward: two more.
        "adjoint": tuple(a + b for a, b in zip(cost(maps["linearize"], 2),
                                                cost(maps["vjp"] * adjoint_steps, 2 * adjoint_steps))),
        # Two transposed convs and two weight gradients.
        "final_backward": cost(_TRACKED_BACKWARD_MAPS[tracked], 4),
    }
    if algorithm == "crbp":
        # The column sums: 2 transposed convs; the tangent pass: 2 convs, 2 transposed convs and
        # 2 weight gradients over twice the batch (4 at B). Autograd's route does the same count.
        out["penalty"] = cost(_PENALTY_MAPS[tracked], 10)
    return out


def phases_fn(cell, x: Tensor, algorithm: str, steps: int, adjoint_steps: int) -> Callable[[], dict[str, float]]:
    """One training iteration as timed phases (module docstring); returns seconds per phase."""
    if algorithm not in PHASE_ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {PHASE_ALGORITHMS} (the phases of an implicit "
                         f"algorithm), got {algorithm!r}")
    device = x.device
    explicit = hasattr(cell, "tracked_step")

    def run() -> dict[str, float]:
        times: dict[str, float] = {}
        cell.zero_grad(set_to_none=True)
        scope = SpectraScope()
        clock = [time.perf_counter()]

        def mark(phase: str) -> None:
            synchronize(device)
            now = time.perf_counter()
            times[phase] = now - clock[0]
            clock[0] = now

        with scope:
            with torch.no_grad():
                h = torch.zeros_like(x)
                for _ in range(steps - 1):
                    h = cell(x, h)
            h_prev = h.detach().requires_grad_(True)
            penalty = None
            if explicit:  # as fixed_point runs it: one node, the column sums in its forward
                out = cell.tracked_step(x, h_prev, 0.9 if algorithm == "crbp" else None)
                state, penalty = out if algorithm == "crbp" else (out, None)
            else:
                state = cell(x, h_prev)
            (dl_dh,) = torch.autograd.grad(state.square().mean(), state, retain_graph=True)
            mark("forward")
            if algorithm == "crbp":
                if penalty is None:
                    penalty = lcp_from_step(state, h_prev, 0.9, create_graph=True)
                (PENALTY_WEIGHT * penalty).backward(retain_graph=True)
                mark("penalty")
            lin = cell.linearization_of(state) if explicit else None  # as fixed_point: the tracked step's factors
            lin = lin if lin is not None else cell.linearize(x, h_prev.detach())
            g = neumann_adjoint(lin.vjp, dl_dh, max_steps=adjoint_steps, tol=0.0).solution
            mark("adjoint")
            state.backward(g)
            mark("final_backward")
        scope.close()
        return times

    return run


def run_phases(sweep: Sweep, env: Environment, rates: MachineRates) -> list[Record]:
    """The phases of every (backend, conv) x implicit algorithm x N of ``sweep``; prints a roofline line per phase."""
    rows = []
    algorithms = [a for a in sweep.algorithms if a in PHASE_ALGORITHMS]
    shape = sweep.shape
    print(rates.line(sweep.device))
    for backend, conv in sweep.available_engines():
        for algorithm in algorithms:
            for steps in sweep.speed_steps:
                cell = make_cell(shape, backend, conv, sweep.device, sweep.seed)
                x = make_inputs(shape, sweep.device, sweep.seed)
                fn = phases_fn(cell, x, algorithm, steps, sweep.adjoint_steps)
                for _ in range(sweep.warmup):
                    fn()
                samples = [fn() for _ in range(sweep.repeats)]
                fused = conv == "fft" and _mix_kernel(sweep.device, torch.float32) is not None
                fused_tracked = passes_for(resolve_backend(backend, sweep.device).name, x) is not None
                model = phase_model(shape, backend, conv, algorithm, steps, sweep.adjoint_steps, fused, fused_tracked)
                print(f"{backend}/{conv} {algorithm} N={steps} K={sweep.adjoint_steps}:")
                for phase in PHASES:
                    if phase not in model:
                        continue
                    summary = summarize([s[phase] for s in samples], shape.batch)
                    nbytes, flops = model[phase]
                    bound = max(nbytes / rates.bandwidth, flops / rates.gemm_flops)
                    kind = "memory" if nbytes / rates.bandwidth >= flops / rates.gemm_flops else "compute"
                    print(f"  roofline {phase:>14}: {nbytes / 1e9:7.3f} GB {flops / 1e9:8.2f} GFLOP -> bound "
                          f"{bound * 1e3:8.2f} ms ({kind}); measured {summary['median_s'] * 1e3:8.2f} ms "
                          f"= {summary['median_s'] / bound:5.1f}x the bound")
                    rows.append(env.record(
                        suite="phases", measure="train_phase", phase=phase, backend=backend, conv=conv,
                        algorithm=algorithm, steps=steps, adjoint_steps=sweep.adjoint_steps,
                        batch=shape.batch, channels=shape.channels, height=shape.height, width=shape.width,
                        kernel_size=shape.kernel_size, status="ok", bytes_moved=int(nbytes), flops=int(flops),
                        note=(f"bound {bound * 1e3:.3f} ms at {rates.bandwidth / 1e9:.1f} GB/s, "
                              f"{rates.gemm_flops / 1e9:.0f} GFLOP/s"),
                        **summary,
                    ))
                total = summarize([sum(s.values()) for s in samples], shape.batch)["median_s"]
                print(f"  {'total':>23}: {total * 1e3:.2f} ms")
    return rows


__all__ = ["PHASES", "PHASE_ALGORITHMS", "MachineRates", "machine_rates", "phase_model", "phases_fn", "run_phases"]
