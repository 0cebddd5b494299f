"""Achieved memory bandwidth of each fused pass, as a fraction of the device's copy bandwidth.

    python -m crbp_fast.hgru.triton.bandwidth                       # paper shape on CUDA
    python -m crbp_fast.hgru.triton.bandwidth --dtype bfloat16 --norm group --out rows.jsonl

Every pass is timed alone (median of ``--repeats`` calls after a warm-up call that compiles
and autotunes; CUDA events on CUDA) on the tensors it sees in a step or a VJP. Its bytes are
the full (B, C, H, W) tensors it reads and writes (the counts of :mod:`crbp_fast.hgru.triton.hgru`)
times the element size; per-channel parameters and reduction partials are left out. The copy
bandwidth is that of ``dst.copy_(src)`` on one such tensor (read + write). ``norm_stats`` is
the moments pass plus the (B, C) torch ops that merge the chunks, so its fraction shows what
those small ops cost. One JSON line per pass (appended as it is measured), then the step's and the VJP's fused passes
together; step / VJP / training-iteration timings are the benchmark suite's (``crbp-fast bench``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import triton

from ..cell import HGRUCell
from ..reference import NORM_KINDS
from . import hgru, ops

PAPER_SHAPE = (32, 25, 150, 150)
STEP_PASSES = ("gate_inh", "norm_stats", "inhibit", "norm_stats", "excite_mix")
VJP_PASSES = ("vjp_excite_mix", "norm_vjp", "vjp_inhibit", "norm_vjp", "vjp_gate_inh")


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(
    shape: tuple[int, int, int, int], kernel_size: int, norm: str, dtype: torch.dtype,
    device: torch.device, repeats: int, emit: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per fused pass, then one per group (step, VJP); see the module docstring. Each
    row is handed to ``emit`` as soon as it is measured."""
    emit = emit or (lambda row: None)
    b, c, hgt, wid = shape
    cell = HGRUCell(c, kernel_size, norm=norm, norm_groups=c if norm == "group" else 1, backend="triton",
                    conv="direct", device=device, dtype=dtype)
    p = cell.params()
    normed = int(norm != "none")
    with torch.no_grad():
        x = torch.randn(shape, device=device, dtype=dtype)
        h = torch.nn.functional.softplus(torch.randn(shape, device=device, dtype=dtype))
        v = torch.randn_like(x)
        c_raw = torch.randn_like(x)
        f = hgru.linearize(x, h, p)
        coefs = hgru.norm_coefs(c_raw, p.norm_inh)
        dc2, dh1, sums2 = hgru.vjp_excite_mix(v, f, p.u2_weight)
    passes: dict[str, tuple[int, Callable[[], object]]] = {
        "gate_inh": (2, lambda: ops.gate_inh(h, p.u1_weight, p.u1_bias, dtype, False)),
        "plane_moments": (normed, lambda: ops.plane_moments(c_raw)),
        "norm_stats": (normed, lambda: hgru.norm_stats(c_raw, p.norm_inh)),
        "inhibit": (4, lambda: ops.inhibit(c_raw, x, h, *coefs, p.alpha, p.mu, dtype, False)),
        "excite_mix": (4, lambda: ops.excite_mix(
            c_raw, h, h, *coefs, p.u2_weight, p.u2_bias, p.kappa, p.gamma, p.omega, dtype, dtype, False)),
        "gate_inh+factors": (4, lambda: ops.gate_inh(h, p.u1_weight, p.u1_bias, dtype, True)),
        "inhibit+factors": (6 + normed, lambda: ops.inhibit(c_raw, x, h, *coefs, p.alpha, p.mu, dtype, True)),
        "excite_mix+factors": (8 + normed, lambda: ops.excite_mix(
            c_raw, h, h, *coefs, p.u2_weight, p.u2_bias, p.kappa, p.gamma, p.omega, dtype, dtype, True)),
        "vjp_excite_mix": (6 + normed, lambda: hgru.vjp_excite_mix(v, f, p.u2_weight)),
        "norm_vjp": (3 * normed, lambda: hgru.norm_vjp(dc2, f.xhat2, f.invstd2, sums2, p.norm_exc)),
        "vjp_inhibit": (8 + normed, lambda: hgru.vjp_inhibit(dh1, v, v, f)),
        "vjp_gate_inh": (5, lambda: hgru.vjp_gate_inh(v, v, f, p.u1_weight, dtype)),
    }
    tensor_bytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    copy_s = median_seconds(lambda: dst.copy_(x), device, repeats)
    copy_bw = 2 * tensor_bytes / copy_s
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "shape": list(shape),
        "kernel_size": kernel_size, "norm": norm, "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats, "copy_gbps": copy_bw / 1e9,
        # the fused passes use neither; recorded so every GPU row says what float32 math was allowed
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None,
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32) if device.type == "cuda" else None,
    }
    rows, seconds = [], {}
    for name, (tensors, fn) in passes.items():
        if tensors == 0:
            continue
        with torch.no_grad():
            seconds[name] = median_seconds(fn, device, repeats)
        rows.append(_row(env, name, tensors, tensor_bytes, seconds[name], copy_bw))
        emit(rows[-1])
    for group, names in (("step passes", STEP_PASSES), ("vjp passes", VJP_PASSES)):
        names = [n for n in names if n in seconds]
        tensors = sum(passes[n][0] for n in names)
        rows.append(_row(env, group, tensors, tensor_bytes, sum(seconds[n] for n in names), copy_bw))
        emit(rows[-1])
    return rows


def _row(env: dict, name: str, tensors: int, tensor_bytes: int, seconds: float, copy_bw: float) -> dict:
    bw = tensors * tensor_bytes / seconds
    return {**env, "pass": name, "tensors": tensors, "median_s": seconds, "gbps": bw / 1e9,
            "fraction_of_copy": bw / copy_bw}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m crbp_fast.hgru.triton.bandwidth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=PAPER_SHAPE, metavar=("B", "C", "H", "W"))
    parser.add_argument("--kernel-size", type=int, default=15)
    parser.add_argument("--norm", choices=NORM_KINDS, default="batch")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per pass (>= 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="append the rows to this JSON-lines file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected an int >= 1, got {args.repeats}")
    device = torch.device(args.device)
    reason = hgru.unavailable_reason(device)
    if reason:
        parser.exit(2, f"{parser.prog}: error: backend 'triton' cannot run on {device}: {reason}\n")

    def emit(row: dict) -> None:  # one whole line per pass, as it is measured: a killed run keeps them
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")

    measure(tuple(args.shape), args.kernel_size, args.norm, getattr(torch, args.dtype), device, args.repeats, emit)


if __name__ == "__main__":
    main(sys.argv[1:])
