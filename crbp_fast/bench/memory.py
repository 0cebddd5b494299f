"""Memory of one training iteration as N grows, per algorithm, backend and conv engine.

Three measures, each a record row with its ``peak_kind``:

- ``saved_for_backward`` (every device): bytes of the unique storages the autograd graph saves
  during the forward of the iteration (fixed point, loss, LCP penalty), counted with
  ``torch.autograd.graph.saved_tensors_hooks``. Exact and noise-free: the quantity that is
  O(N) for BPTT and O(1) for RBP.
- ``rss`` (CPU): the peak resident set (``getrusage`` ``ru_maxrss``) of a fresh child process
  that builds the cell and the inputs, notes its RSS (``baseline_bytes``), and runs the
  iteration once. The raw peak is recorded; the table shows peak - baseline beside it.
- ``cuda_max_allocated`` (CUDA): ``torch.cuda.max_memory_allocated`` over the iteration, after
  ``empty_cache`` and ``reset_peak_memory_stats``; ``baseline_bytes`` is what was allocated
  before it (parameters and inputs).
"""

from __future__ import annotations

import gc
import resource
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .child import run_in_child
from .records import Environment, Record
from .setups import Shape, Sweep, is_out_of_memory, make_cell, make_inputs, train_iteration_fn, training_loss


class SavedTensorBytes:
    """Context manager: bytes of the unique storages autograd saves for backward inside it."""

    def __init__(self) -> None:
        self._storages: dict[tuple[str, int], int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self._storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self._storages.values())


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def rss_child(
    shape: dict, backend: str, conv: str, algorithm: str, steps: int, adjoint_steps: int, threads: int, seed: int,
) -> dict:
    """In a fresh CPU process: RSS after set-up, then the peak RSS over one training iteration."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    cell = make_cell(Shape(**shape), backend, conv, device, seed)
    x = make_inputs(Shape(**shape), device, seed)
    run = train_iteration_fn(cell, x, algorithm, steps, adjoint_steps)
    baseline = _maxrss_bytes()
    stats = run()
    return {"baseline": baseline, "peak": _maxrss_bytes(), "adjoint_iterations": stats.adjoint_iterations}


def reset_cuda_peak(device: torch.device) -> int | None:
    """On CUDA: free what can be freed, reset the peak counter, and return the bytes allocated
    now (the baseline of a ``cuda_max_allocated`` row); None elsewhere."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


#: The forward of one training iteration: returns the loss and a function that, after the
#: backward, says how many adjoint iterations it ran (None without an adjoint).
LossFn = Callable[[], tuple[torch.Tensor, Callable[[], int | None]]]


def measure_iteration(device: torch.device, loss_fn: LossFn) -> tuple[int, int | None, int | None, int | None]:
    """(saved bytes, cuda baseline, cuda peak, adjoint iterations) of one training iteration:
    the forward ``loss_fn()`` under :class:`SavedTensorBytes`, then its backward; the CUDA peak
    covers both."""
    baseline = reset_cuda_peak(device)
    with SavedTensorBytes() as saved:
        loss, adjoint_iterations = loss_fn()
    loss.backward()
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    del loss
    return saved.total, baseline, peak, adjoint_iterations()


def iteration_rows(env: Environment, config: dict, device: torch.device, loss_fn: LossFn) -> list[Record]:
    """The rows of one configuration: ``saved_for_backward`` (and on CUDA ``cuda_max_allocated``)
    of :func:`measure_iteration`, or one ``out_of_memory`` / ``unavailable`` row saying why not.
    ``config``: the rows' fields (suite, measure, algorithm, backend, conv, steps, shape, ...)."""
    cuda = device.type == "cuda"
    try:
        saved, baseline, peak, iters = measure_iteration(device, loss_fn)
    except Exception as err:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
        status = "out_of_memory" if is_out_of_memory(err) else "unavailable"
        note = f"{type(err).__name__}: {err}".splitlines()[0]
        _note(config, status, note)
        return [env.record(**{**config, "status": status, "note": note})]
    rows = [env.record(**config, status="ok", peak_kind="saved_for_backward", peak_bytes=saved,
                       adjoint_iterations=iters)]
    if cuda:
        rows.append(env.record(**config, status="ok", peak_kind="cuda_max_allocated", peak_bytes=peak,
                               baseline_bytes=baseline, adjoint_iterations=iters))
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def run_memory(
    sweep: Sweep, env: Environment, snapshot: Path | None = None,
    emit: Callable[[list[Record]], None] | None = None,
) -> list[Record]:
    """The memory suite over ``sweep``; returns the rows, and hands each configuration's rows to
    ``emit`` as soon as they are measured (the CLI appends them to the records file there).

    Each configuration runs once in this process (saved bytes; CUDA peak), then, on CPU, once
    more in a fresh child for its peak RSS (``sweep.rss_jobs`` children at a time).
    """
    emit = emit or (lambda rows: None)
    device = sweep.device
    cuda = device.type == "cuda"
    configs = [
        dict(suite="memory", measure="train_iteration", algorithm=algorithm, backend=backend, conv=conv,
             steps=steps, adjoint_steps=sweep.adjoint_steps, **asdict(sweep.shape))
        for backend, conv in sweep.available_engines() for algorithm in sweep.algorithms for steps in sweep.steps
    ]
    rows: list[list[Record]] = []
    if snapshot is not None:
        torch.cuda.memory._record_memory_history(max_entries=200_000, device=device)
    try:
        for config in tqdm(configs, desc="memory", unit="cfg"):
            rows.append(_measure_in_process(sweep, env, config))
            emit(rows[-1])
        if snapshot is not None:
            torch.cuda.memory._dump_snapshot(str(snapshot))
    finally:
        if snapshot is not None:
            torch.cuda.memory._record_memory_history(enabled=None)
    if sweep.rss and not cuda:
        measured = [i for i, config_rows in enumerate(rows) if config_rows[0].status == "ok"]
        with ThreadPoolExecutor(max_workers=sweep.rss_jobs) as pool:
            futures = {pool.submit(_rss_row, sweep, env, configs[i]): i for i in measured}
            for future in tqdm(as_completed(futures), total=len(futures), desc="memory (rss)", unit="cfg"):
                rows[futures[future]].append(future.result())
                emit([rows[futures[future]][-1]])
    return [row for config_rows in rows for row in config_rows]


def _note(config: dict, status: str, note: str) -> None:
    where = f"{config['backend']}/{config['conv']} {config['algorithm']} N={config['steps']}"
    tqdm.write(f"note: {where}: {status}: {note}")


def _measure_in_process(sweep: Sweep, env: Environment, config: dict) -> list[Record]:
    """The saved-for-backward row (and on CUDA the max-allocated row) of one configuration."""
    device = sweep.device
    cell = make_cell(sweep.shape, config["backend"], config["conv"], device, sweep.seed)
    x = make_inputs(sweep.shape, device, sweep.seed)

    def loss_fn():
        cell.zero_grad(set_to_none=True)
        loss, stats = training_loss(cell, x, config["algorithm"], config["steps"], sweep.adjoint_steps)
        return loss, lambda: stats.adjoint_iterations

    try:
        return iteration_rows(env, config, device, loss_fn)
    finally:
        del cell, x, loss_fn


def _rss_row(sweep: Sweep, env: Environment, config: dict) -> Record:
    """The peak-RSS row of one configuration, from a fresh child process."""
    outcome = run_in_child(rss_child, dict(
        shape=asdict(sweep.shape), backend=config["backend"], conv=config["conv"], algorithm=config["algorithm"],
        steps=config["steps"], adjoint_steps=sweep.adjoint_steps, threads=env.threads, seed=sweep.seed,
    ))
    if outcome.status == "ok":
        return env.record(**config, status="ok", peak_kind="rss", peak_bytes=outcome.value["peak"],
                          baseline_bytes=outcome.value["baseline"],
                          adjoint_iterations=outcome.value["adjoint_iterations"])
    killed = outcome.status == "killed" and "SIGKILL" in outcome.message
    oom = killed or "can't allocate memory" in outcome.message or "MemoryError" in outcome.message
    status = "out_of_memory" if oom else "unavailable"
    note = f"rss child: {outcome.message}".splitlines()[0] + (" (most likely the OOM killer)" if killed else "")
    _note(config, status, note)
    return env.record(**config, status=status, note=note)


__all__ = ["LossFn", "SavedTensorBytes", "iteration_rows", "measure_iteration", "reset_cuda_peak", "rss_child", "run_memory"]
