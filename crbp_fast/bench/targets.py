"""The speed targets of a C-RBP training iteration, measured in one run, interleaved.

``crbp-fast bench targets`` times, in one process and round-robin (so machine load falls on
every contender alike), medians of ``repeats``:

- ``iteration``: one crbp training iteration (N steps, K adjoint products at ``adjoint_tol=0``,
  loss mean(h_N^2) + 10 x LCP, backward) with the defaults (``backend="auto"``, ``conv="auto"``,
  ``cell.linearize``) against the published algorithm (``backend="torch"``, ``conv="direct"``:
  the adjoint and the penalty through autograd, ``use_linearize=False``), and against BPTT at
  ``bptt_steps`` with the defaults; plus the relative error of the default's parameter gradients
  against the published algorithm's (per parameter and in total);
- ``step`` / ``vjp``: one no-grad step and one adjoint product J^T v at the settled state, the
  defaults against ``backend="torch", conv="direct"``, each timed right after an untimed call of
  itself (warm, as inside the fixed-point loop).

Each ratio is compared with its target (the targets of the CPU and GPU shapes below) and
reported as met or missed; nothing is asserted, the numbers are the result.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..tasks.runs import atomic_write_text
from .records import device_name
from .setups import Shape, make_cell, make_inputs, step_fn, synchronize, train_iteration_fn, vjp_fn


@dataclass(frozen=True)
class TargetSetting:
    """The shapes, steps and target ratios of one device kind."""

    iteration_shape: Shape
    steps: int  # N of the iteration
    adjoint_steps: int  # K
    op_shape: Shape  # of the step and VJP timings
    iteration_ratio: float  # default crbp iteration vs the published one
    op_ratio: float | None  # default step / VJP vs torch/direct (None: no target)
    bptt_ratio: float | None  # default crbp iteration vs default BPTT at bptt_steps (None: no target)
    bptt_steps: int = 6
    grad_rtol: float = 1e-4


SETTINGS = {
    "cpu": TargetSetting(Shape(2, 25, 150, 150, 15), 10, 10, Shape(4, 25, 150, 150, 15), 6.0, 8.0, None),
    "cuda": TargetSetting(Shape(32, 25, 150, 150, 15), 20, 15, Shape(32, 25, 150, 150, 15), 4.0, None, 1.0),
}


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                 progress: Callable[[str], None] | None, warm_each: bool = False) -> dict[str, list[float]]:
    """Round-robin timings; ``warm_each``: one untimed call before each timed one, so a short op
    is timed warm, as it runs inside a loop of its own kind (right after a 0.5 s direct-conv
    step a 0.08 s FFT step measured about 40% slower, from caches the other op had evicted)."""
    for name, fn in fns.items():  # warm-up: plans, spectra, allocator
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            if warm_each:
                fn()
                synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress(f"round {r + 1}/{repeats}: " + ", ".join(f"{n} {v[-1]:.3f} s" for n, v in times.items()))
    return times


def _grad_errors(cell, reference) -> dict[str, float]:
    out = {}
    for (name, a), (_, b) in zip(cell.named_parameters(), reference.named_parameters()):
        out[name] = float((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-30))
    return out


def measure_targets(device: torch.device, setting: TargetSetting, repeats: int = 3,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Run the target timings of ``setting`` on ``device`` (module docstring); returns a JSON-able dict."""
    if repeats < 1:
        raise ValueError(f"repeats: expected an integer >= 1, got {repeats!r}")
    s = setting
    x = make_inputs(s.iteration_shape, device)
    published = make_cell(s.iteration_shape, "torch", "direct", device)
    default = make_cell(s.iteration_shape, "auto", "auto", device)
    fns = {
        "published crbp": train_iteration_fn(published, x, "crbp", s.steps, s.adjoint_steps, use_linearize=False),
        "default crbp": train_iteration_fn(default, x, "crbp", s.steps, s.adjoint_steps),
        f"default bptt{s.bptt_steps}": train_iteration_fn(default, x, "bptt", s.bptt_steps, 0),
    }
    it_times = _interleaved(fns, repeats, device, progress)
    fns["published crbp"]()  # the gradients of both crbp iterations, same weights and input
    fns["default crbp"]()
    errors = _grad_errors(default, published)
    mine, theirs = (torch.cat([p.grad.reshape(-1) for p in c.parameters()]) for c in (default, published))
    total = float((mine - theirs).norm() / theirs.norm())
    del fns, published, default, x

    xo = make_inputs(s.op_shape, device)
    ref, dft = make_cell(s.op_shape, "torch", "direct", device), make_cell(s.op_shape, "auto", "auto", device)
    op_fns = {"step torch/direct": step_fn(ref, xo), "step default": step_fn(dft, xo),
              "vjp torch/direct": vjp_fn(ref, xo), "vjp default": vjp_fn(dft, xo)}
    op_times = _interleaved(op_fns, max(repeats, 5), device, progress, warm_each=True)

    med = {k: statistics.median(v) for k, v in {**it_times, **op_times}.items()}
    bptt = f"default bptt{s.bptt_steps}"
    rows = [
        _row("crbp iteration vs published", med["published crbp"] / med["default crbp"], s.iteration_ratio),
        _row(f"crbp iteration vs bptt{s.bptt_steps}", med[bptt] / med["default crbp"], s.bptt_ratio),
        _row("gradients: worst parameter relative error", max(errors.values()), s.grad_rtol, lower_is_better=True),
        _row("no-grad step vs torch/direct", med["step torch/direct"] / med["step default"], s.op_ratio),
        _row("adjoint VJP vs torch/direct", med["vjp torch/direct"] / med["vjp default"], s.op_ratio),
    ]
    return {
        "device": str(device), "device_name": device_name(device), "cpu_isa": _cpu_isa(device),
        "threads": torch.get_num_threads(), "setting": _setting_dict(s),
        "repeats": repeats, "median_s": med, "samples_s": {**it_times, **op_times},
        "grad_rel_err": errors, "grad_rel_err_total": total, "rows": rows,
    }


def _cpu_isa(device: torch.device) -> str | None:
    """The instruction set the native CPU kernels ran with (None on a GPU or without the extension)."""
    if device.type != "cpu":
        return None
    try:
        from crbp_fast.hgru.native import _C
    except ImportError:
        return None
    return _C.cpu_isa()


def _setting_dict(s: TargetSetting) -> dict:
    d = asdict(s)
    d["iteration_shape"], d["op_shape"] = s.iteration_shape.id, s.op_shape.id
    return d


def _row(name: str, value: float, target: float | None, lower_is_better: bool = False) -> dict:
    if target is None:
        status = "no target"
    else:
        status = "met" if (value <= target if lower_is_better else value >= target) else "missed"
    return {"name": name, "value": value, "target": target, "status": status, "lower_is_better": lower_is_better}


def format_targets(result: dict) -> str:
    """The rows of :func:`measure_targets` as an aligned table."""
    lines = [f"targets on {result['device']} ({result['threads']} thread(s)), medians of {result['repeats']}:"]
    for r in result["rows"]:
        error = r["lower_is_better"]  # an error bound, not a speed-up
        value = f"{r['value']:.3g}" if error else f"{r['value']:.2f}x"
        target = "-" if r["target"] is None else (f"<= {r['target']:g}" if error else f">= {r['target']:g}x")
        lines.append(f"  {r['name']:44s} {value:>10s}  target {target:>9s}  {r['status']}")
    for name, t in result["median_s"].items():
        lines.append(f"  {name:44s} {t:10.4f} s")
    return "\n".join(lines)


def write_targets(result: dict, path: Path) -> None:
    """Write the result as JSON (atomically: a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
