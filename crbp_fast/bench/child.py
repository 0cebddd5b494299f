"""Run one measurement in a fresh child process, so no earlier configuration shapes its memory.

POSIX uses a fork server that imported torch and crbp_fast once (a child then starts in ~0.2 s
instead of re-importing torch); elsewhere each child is spawned. Either way the child has run
nothing before its own configuration.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from dataclasses import dataclass
from typing import Any, Callable

_PRELOAD = ["torch", "crbp_fast", "crbp_fast.bench.memory", "crbp_fast.bench.speed"]
_context = None


@dataclass
class ChildOutcome:
    """``status``: "ok" (``value`` is what the target returned), "error" (``message``), "killed"
    (died from a signal; ``message`` names it), or "timeout"."""

    status: str
    value: Any = None
    message: str = ""


def _context_for_children():
    global _context
    if _context is None:
        if "forkserver" in mp.get_all_start_methods():
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(_PRELOAD)
        else:
            _context = mp.get_context("spawn")
    return _context


def _entry(conn, target: Callable[..., Any], kwargs: dict) -> None:
    try:
        conn.send(("ok", target(**kwargs)))
    except Exception as err:  # reported to the parent, which decides what it means
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def run_in_child(target: Callable[..., Any], kwargs: dict, timeout: float | None = None) -> ChildOutcome:
    """``target(**kwargs)`` in a fresh process (``target`` must be a module-level function)."""
    ctx = _context_for_children()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_entry, args=(send, target, kwargs), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            return ChildOutcome("timeout", message=f"did not finish within {timeout:g} s")
        try:
            status, value = recv.recv()
        except EOFError:  # the child died before it could answer
            proc.join()
            code = proc.exitcode
            if code is not None and code < 0:
                name = signal.Signals(-code).name
                return ChildOutcome("killed", message=f"the child process died from {name}")
            return ChildOutcome("error", message=f"the child process exited with code {code} and no result")
        if status == "ok":
            return ChildOutcome("ok", value=value)
        return ChildOutcome("error", message=value)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()


__all__ = ["ChildOutcome", "run_in_child"]
