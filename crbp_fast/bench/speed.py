"""Speed of the single operations and of a training iteration, per algorithm, backend and conv.

Measures (each a record row): ``step`` (one no-grad step F(x, h)), ``elementwise`` (the same
step with the two conv outputs precomputed: the backend's elementwise passes alone), ``vjp`` (one adjoint
product J^T v, ``cell.linearize`` taken once), ``train_iteration`` (fixed point with N steps,
loss, LCP penalty, backward) and ``compiled_step`` (``torch.compile`` of the reference cell's
step, a baseline, in a child process with a time limit). Each is called ``warmup`` times (the
first call doubles as the check that the configuration runs at all), then timed ``repeats``
times: on CUDA with CUDA events around each call, on CPU with ``time.perf_counter``. Rows keep
the median and the 20% / 80% quantiles of the repeats, and images per second = B / median.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .child import run_in_child
from .records import Environment, Record
from .setups import (
    Shape, Sweep, elementwise_fn, is_out_of_memory, make_cell, make_inputs, settled_state, step_fn, synchronize,
    train_iteration_fn, vjp_fn,
)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (already warmed up)."""
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def summarize(samples: list[float], batch: int) -> dict:
    """median / p20 / p80 seconds, repeats and images per second of timing samples."""
    p20, median, p80 = (float(q) for q in np.quantile(np.asarray(samples, dtype=np.float64), [0.2, 0.5, 0.8]))
    return {"repeats": len(samples), "median_s": median, "p20_s": p20, "p80_s": p80, "images_per_s": batch / median}


def compiled_step_child(shape: dict, device: str, threads: int, seed: int, repeats: int, warmup: int) -> dict:
    """In a fresh process: compile the reference cell's step, then time it like the others."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    cell = make_cell(Shape(**shape), "torch", "direct", dev, seed)
    x = make_inputs(Shape(**shape), dev, seed)
    h = settled_state(cell, x)
    compiled = torch.compile(cell)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return compiled(x, h)

    t0 = time.perf_counter()
    run()
    synchronize(dev)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        run()
    return {"samples": time_calls(run, dev, repeats), "compile_s": compile_s}


def run_speed(sweep: Sweep, env: Environment, emit: Callable[[list[Record]], None] | None = None) -> list[Record]:
    """The speed suite over ``sweep``; returns the rows, and hands each to ``emit`` as soon as it
    is measured (the CLI appends it to the records file there).

    The ``torch.compile`` baseline comes last: it is the one measurement that can take minutes.
    """
    emit = emit or (lambda rows: None)
    shape = asdict(sweep.shape)
    tasks: list[tuple[str, str, str, str | None, int | None]] = []
    for backend, conv in sweep.available_engines():
        tasks += [(m, backend, conv, None, None) for m in ("step", "elementwise", "vjp")]
        tasks += [("train_iteration", backend, conv, a, n) for a in sweep.algorithms for n in sweep.speed_steps]
    if sweep.compile:
        tasks.append(("compiled_step", "torch", "direct", None, None))
    rows = []
    for measure, backend, conv, algorithm, steps in tqdm(tasks, desc="speed", unit="cfg"):
        config = dict(suite="speed", measure=measure, backend=backend, conv=conv, algorithm=algorithm, steps=steps,
                      adjoint_steps=sweep.adjoint_steps if measure == "train_iteration" else None, **shape)
        rows.append(_compiled_row(sweep, env, config) if measure == "compiled_step" else _timed_row(sweep, env, config))
        emit(rows[-1:])
    return rows


def _timed_row(sweep: Sweep, env: Environment, config: dict) -> Record:
    device = sweep.device
    measure, algorithm, steps = config["measure"], config["algorithm"], config["steps"]
    stats = None
    try:
        cell = make_cell(sweep.shape, config["backend"], config["conv"], device, sweep.seed)
        x = make_inputs(sweep.shape, device, sweep.seed)
        if measure == "step":
            fn = step_fn(cell, x)
        elif measure == "elementwise":
            fn = elementwise_fn(cell, x)
        elif measure == "vjp":
            fn = vjp_fn(cell, x)
        else:
            fn = train_iteration_fn(cell, x, algorithm, steps, sweep.adjoint_steps)
        stats = fn()
        synchronize(device)
    except Exception as err:
        status = "out_of_memory" if is_out_of_memory(err) else "unavailable"
        note = f"{type(err).__name__}: {err}".splitlines()[0]
        where = f"{config['backend']}/{config['conv']} {measure}" + (f" {algorithm} N={steps}" if algorithm else "")
        tqdm.write(f"note: {where}: {status}: {note}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return env.record(**config, status=status, note=note)
    for _ in range(sweep.warmup - 1):
        stats = fn()
    summary = summarize(time_calls(fn, device, sweep.repeats), sweep.shape.batch)
    iters = stats.adjoint_iterations if measure == "train_iteration" else None
    return env.record(**config, status="ok", adjoint_iterations=iters, **summary)


def _compiled_row(sweep: Sweep, env: Environment, config: dict) -> Record:
    outcome = run_in_child(compiled_step_child, dict(
        shape=asdict(sweep.shape), device=str(sweep.device), threads=env.threads, seed=sweep.seed,
        repeats=sweep.repeats, warmup=sweep.warmup,
    ), timeout=sweep.compile_timeout)
    if outcome.status != "ok":
        note = f"torch.compile: {outcome.message}".splitlines()[0]
        tqdm.write(f"note: compiled_step: unavailable: {note}")
        return env.record(**config, status="unavailable", note=note)
    summary = summarize(outcome.value["samples"], sweep.shape.batch)
    note = f"torch.compile(HGRUCell(backend='torch', conv='direct')); compile {outcome.value['compile_s']:.1f} s"
    return env.record(**config, status="ok", note=note, **summary)


__all__ = ["compiled_step_child", "run_speed", "summarize", "time_calls"]
