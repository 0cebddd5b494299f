"""Plots of :class:`crbp_fast.FixedPointTrace`: how a forward solve and its adjoint converged.

``fixed_point(..., trace=True)`` records, per forward evaluation and per sample, the relative
residual ||F(x, z) - z|| / ||F(x, z)||, and per adjoint iteration of the last backward the
relative residual of the adjoint (see :class:`crbp_fast.engine.fixed_point.FixedPointTrace`). These
draw them on a log scale, for one call or several side by side (``crbp-fast diagnose`` draws one
per checkpoint; a benchmark or a training script can call :func:`plot_trace` on any stats).

Example:
    >>> res = fixed_point(cell, x, steps=30, algorithm="crbp", trace=True)
    >>> res.state.sum().backward()
    >>> plot_trace(res.stats, "trace.png")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def trace_series(trace) -> dict:
    """``{"forward_max", "forward_median", "adjoint"}`` (NumPy arrays; adjoint may be None) of a
    :class:`FixedPointStats` (with a trace), a :class:`FixedPointTrace` or its ``as_dict()``."""
    from .fixed_point import FixedPointStats, FixedPointTrace

    if isinstance(trace, FixedPointStats):
        if trace.trace is None:
            raise ValueError("trace: these stats have no trace; run fixed_point(..., trace=True)")
        trace = trace.trace
    if isinstance(trace, FixedPointTrace):
        fwd = trace.forward.detach().double().cpu().numpy()
        adj = None if trace.adjoint is None else trace.adjoint.detach().double().cpu().numpy()
    elif isinstance(trace, dict) and "forward" in trace:
        fwd = np.asarray(trace["forward"], dtype=np.float64)
        adj = None if trace.get("adjoint") is None else np.asarray(trace["adjoint"], dtype=np.float64)
    else:
        raise TypeError(f"trace: expected FixedPointStats, FixedPointTrace or its as_dict(), got {type(trace).__name__}")
    fwd = fwd.reshape(fwd.shape[0], -1) if fwd.size else np.zeros((0, 1))
    return {"forward_max": fwd.max(axis=1) if fwd.size else fwd[:, 0], "forward_median":
            np.median(fwd, axis=1) if fwd.size else fwd[:, 0], "adjoint": adj}


def plot_trace(trace, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw forward and adjoint residuals per iteration (log scale) into the PNG ``path``.

    ``trace``: one trace (see :func:`trace_series`), or a dict ``{label: trace}`` drawn together.
    Forward: the worst sample's residual (solid) and the median sample's (dashed), with the lowest
    point marked; adjoint (when any was recorded): the last backward's residual per iteration.
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = isinstance(trace, dict) and "forward" not in trace
    series = {k: trace_series(v) for k, v in trace.items()} if many else {None: trace_series(trace)}
    with_adjoint = any(s["adjoint"] is not None and s["adjoint"].size for s in series.values())
    fig, axes = plt.subplots(1, 2 if with_adjoint else 1, figsize=(11 if with_adjoint else 6, 4), squeeze=False)
    ax = axes[0, 0]
    floor = np.finfo(np.float64).tiny
    for i, (label, s) in enumerate(series.items()):
        t = np.arange(1, len(s["forward_max"]) + 1)
        if not len(t):
            continue
        name = f"{label}: " if label is not None else ""
        ax.semilogy(t, np.maximum(s["forward_max"], floor), color=f"C{i}", label=f"{name}worst sample")
        ax.semilogy(t, np.maximum(s["forward_median"], floor), color=f"C{i}", linestyle="--", linewidth=1,
                    label=f"{name}median sample")
        j = int(np.argmin(s["forward_max"]))
        ax.scatter([t[j]], [max(s["forward_max"][j], floor)], color=f"C{i}", marker="v", zorder=3,
                   label=f"{name}lowest {s['forward_max'][j]:.2g} at {t[j]}")
    ax.set_xlabel("forward evaluation")
    ax.set_ylabel("||F(x, z) - z|| / ||F(x, z)||")
    ax.set_title("forward solve", fontsize=10)
    ax.legend(fontsize=7)
    if with_adjoint:
        ax = axes[0, 1]
        for i, (label, s) in enumerate(series.items()):
            if s["adjoint"] is None or not s["adjoint"].size:
                continue
            k = np.arange(1, len(s["adjoint"]) + 1)
            name = f"{label}: " if label is not None else ""
            ax.semilogy(k, np.maximum(s["adjoint"], floor), color=f"C{i}", marker=".",
                        label=f"{name}lowest {s['adjoint'].min():.2g}")
        ax.set_xlabel("adjoint iteration")
        ax.set_ylabel("relative residual")
        ax.set_title("adjoint (last backward)", fontsize=10)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_trace", "trace_series"]
