"""Plots and Markdown tables drawn from stored benchmark records (never from a live run).

For every configuration only its latest run counts. Rows are grouped by device, shape and dtype;
each group gets ``<device-slug>_<shape>_memory.png`` (memory vs N, one line per algorithm /
backend / conv; a panel per memory kind) and ``<device-slug>_<shape>_speed.png`` (single
operations and training iterations), and a Markdown section.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib import ticker  # noqa: E402

from ..engine.fixed_point import ALGORITHMS  # noqa: E402
from .records import Record, device_slug  # noqa: E402

MIB = 2.0**20
_KIND_TITLES = {
    "saved_for_backward": "saved for backward (MiB)",
    "rss": "peak RSS of a fresh process, above its post-set-up baseline (MiB)",
    "cuda_max_allocated": "CUDA max allocated (MiB)",
}
_ALGORITHM_COLORS = {"bptt": "tab:red", "cbptt": "tab:orange", "rbp": "tab:blue", "crbp": "tab:green"}
_STATUS_CELLS = {"out_of_memory": "OOM", "unavailable": "n/a"}
#: Speed measures in table order.
_MEASURE_ORDER = {"step": 0, "elementwise": 1, "vjp": 2, "compiled_step": 3, "train_iteration": 4}


def _config_key(row: Record) -> tuple:
    return (row.suite, row.measure, row.device_name, row.shape_id, row.dtype, row.algorithm, row.backend,
            row.conv, row.steps, row.adjoint_steps)


def latest(rows: list[Record]) -> list[Record]:
    """The rows of the latest run of each configuration (file order breaks timestamp ties)."""
    newest: dict[tuple, tuple[str, int, str]] = {}
    for index, row in enumerate(rows):
        key = _config_key(row)
        stamp = (row.timestamp, index, row.run_id)
        if key not in newest or stamp[:2] >= newest[key][:2]:
            newest[key] = stamp
    return [row for row in rows if row.run_id == newest[_config_key(row)][2]]


def groups(rows: list[Record]) -> dict[tuple[str, str, str], list[Record]]:
    """Rows by (device name, shape id, dtype), in first-seen order."""
    out: dict[tuple[str, str, str], list[Record]] = {}
    for row in rows:
        out.setdefault((row.device_name, row.shape_id, row.dtype), []).append(row)
    return out


def _series_key(row: Record) -> tuple:
    order = ALGORITHMS.index(row.algorithm) if row.algorithm in ALGORITHMS else len(ALGORITHMS)
    return (order, row.algorithm or "", row.backend, row.conv)


def _label(row: Record) -> str:
    return f"{row.algorithm}  {row.backend}/{row.conv}" if row.algorithm else f"{row.backend}/{row.conv}"


def _memory_value(row: Record) -> float:
    """MiB to plot: the peak, less the child's baseline for RSS."""
    if row.peak_kind == "rss":
        return (row.peak_bytes - row.baseline_bytes) / MIB
    return row.peak_bytes / MIB


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _memory_series(rows: list[Record]) -> dict[str, dict[tuple, dict[int, Record]]]:
    """kind -> series (algorithm, backend, conv) -> N -> row; failed rows join every kind present."""
    by_kind: dict[str, dict[tuple, dict[int, Record]]] = defaultdict(lambda: defaultdict(dict))
    mem = [r for r in rows if r.suite == "memory"]
    kinds = sorted({r.peak_kind for r in mem if r.peak_kind}, key=list(_KIND_TITLES).index)
    for row in mem:
        if row.peak_kind:
            by_kind[row.peak_kind][_series_key(row)][row.steps] = row
    for row in mem:
        if not row.peak_kind:  # a configuration that did not run: a gap in every kind
            for kind in kinds:
                by_kind[kind][_series_key(row)].setdefault(row.steps, row)
    return {kind: by_kind[kind] for kind in kinds}


def memory_table(rows: list[Record]) -> str:
    """Markdown: per memory kind, MiB per N for each algorithm / backend / conv, and the ratio of
    the largest N's value to the smallest N's."""
    parts = []
    for kind, series in _memory_series(rows).items():
        ns = sorted({n for points in series.values() for n in points})
        lines = [f"Memory, {_KIND_TITLES[kind]}" + (" [raw peak]" if kind == "rss" else ""), ""]
        lines.append("| algorithm | backend | conv | " + " | ".join(f"N={n}" for n in ns) + " | N max / N min |")
        lines.append("| --- | --- | --- | " + " | ".join("---:" for _ in ns) + " | ---: |")
        for key in sorted(series):
            points = series[key]
            cells = []
            for n in ns:
                row = points.get(n)
                if row is None:
                    cells.append("")
                elif row.status != "ok":
                    cells.append(_STATUS_CELLS[row.status])
                elif kind == "rss":
                    cells.append(f"{_fmt(_memory_value(row))} [{_fmt(row.peak_bytes / MIB)}]")
                else:
                    cells.append(_fmt(_memory_value(row)))
            ok = {n: r for n, r in points.items() if r.status == "ok"}
            ratio = ""
            if len(ok) >= 2 and _memory_value(ok[min(ok)]) > 0:
                ratio = f"{_memory_value(ok[max(ok)]) / _memory_value(ok[min(ok)]):.3f}"
            row0 = next(iter(points.values()))
            lines.append(f"| {row0.algorithm} | {row0.backend} | {row0.conv} | " + " | ".join(cells) + f" | {ratio} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def speed_table(rows: list[Record]) -> str:
    """Markdown: median and 20-80% ms and images/s of every speed measurement."""
    speed = sorted(
        (r for r in rows if r.suite == "speed"),
        key=lambda r: (_MEASURE_ORDER[r.measure], r.backend, r.conv, _series_key(r), r.steps or 0),
    )
    if not speed:
        return ""
    lines = [
        "Speed (median of the repeats; 20-80% range)", "",
        "| measure | algorithm | backend | conv | N | median ms | p20-p80 ms | images/s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in speed:
        head = f"| {r.measure} | {r.algorithm or ''} | {r.backend} | {r.conv} | {r.steps or ''} |"
        if r.status != "ok":
            lines.append(f"{head} {_STATUS_CELLS[r.status]} | | |")
            continue
        lines.append(
            f"{head} {_fmt(r.median_s * 1e3)} | {_fmt(r.p20_s * 1e3)}-{_fmt(r.p80_s * 1e3)} | {_fmt(r.images_per_s)} |"
        )
    notes = [f"- {r.measure} {_label(r)}" + (f" N={r.steps}" if r.steps else "") + f": {r.note}"
             for r in speed if r.note]
    mem_notes = [f"- memory {_label(r)} N={r.steps}: {r.note}" for r in rows if r.suite == "memory" and r.note]
    if notes or mem_notes:
        lines += ["", "Notes:", *notes, *mem_notes]
    return "\n".join(lines)


def _group_header(key: tuple[str, str, str], rows: list[Record]) -> str:
    device, shape_id, dtype = key
    threads = sorted({r.threads for r in rows})
    torch_versions = sorted({r.torch_version for r in rows})
    commits = sorted({(r.git_commit or "unknown")[:10] + ("+dirty" if r.git_dirty else "") for r in rows})
    dates = sorted({r.timestamp[:10] for r in rows})
    adjoint = sorted({r.adjoint_steps for r in rows if r.adjoint_steps is not None})
    return (
        f"### {device}, {shape_id}, {dtype}\n\n"
        f"torch {', '.join(torch_versions)}; threads {', '.join(map(str, threads))}; "
        f"adjoint steps {', '.join(map(str, adjoint)) or '-'}; commit {', '.join(commits)}; {', '.join(dates)}"
    )


def markdown(rows: list[Record]) -> str:
    """The Markdown report of ``rows`` (latest run per configuration), one section per group."""
    sections = []
    for key, group in groups(latest(rows)).items():
        body = [_group_header(key, group), memory_table(group), speed_table(group)]
        sections.append("\n\n".join(part for part in body if part))
    return "\n\n".join(sections)


def plot_memory(rows: list[Record], path: Path) -> bool:
    """Memory vs N, a panel per memory kind; False (nothing written) without memory rows."""
    by_kind = _memory_series(rows)
    if not by_kind:
        return False
    fig, axes = plt.subplots(1, len(by_kind), figsize=(6.2 * len(by_kind), 4.4), squeeze=False)
    for ax, (kind, series) in zip(axes[0], by_kind.items()):
        values = []
        pairs = sorted({key[2:] for key in series})
        styles = {pair: ("-", "--", ":", "-.")[i % 4] for i, pair in enumerate(pairs)}
        for key in sorted(series):
            ok = sorted((n, r) for n, r in series[key].items() if r.status == "ok")
            if not ok:
                continue
            ys = [_memory_value(r) for _, r in ok]
            values += ys
            row = ok[0][1]
            ax.plot([n for n, _ in ok], ys, marker="o", label=_label(row),
                    color=_ALGORITHM_COLORS.get(row.algorithm), linestyle=styles[key[2:]])
        positive = [v for v in values if v > 0]
        ns = sorted({n for points in series.values() for n in points})
        if positive and max(positive) / min(positive) > 30 and min(ns) > 0:
            # Log-log: O(N) becomes a line of slope 1 and O(1) a flat one, both readable.
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("N (forward steps)")
        ax.set_title(_KIND_TITLES[kind], fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(f"One training iteration: {first.device_name}, {first.shape_id}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speed(rows: list[Record], path: Path) -> bool:
    """Bars: single operations (median ms, 20-80% whiskers) and training images/s per N."""
    speed = [r for r in rows if r.suite == "speed" and r.status == "ok"]
    if not speed:
        return False
    ops = sorted(
        (r for r in speed if r.measure != "train_iteration"), key=lambda r: (_MEASURE_ORDER[r.measure], _label(r)),
    )
    train = [r for r in speed if r.measure == "train_iteration"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 2]})
    ax = axes[0]
    if ops:
        # Horizontal bars, one labelled row each, on a log axis: the operations span decades.
        labels = [f"{r.measure}  {_label(r)}" for r in ops]
        med = [r.median_s * 1e3 for r in ops]
        err = [[(r.median_s - r.p20_s) * 1e3 for r in ops], [(r.p80_s - r.median_s) * 1e3 for r in ops]]
        ax.barh(range(len(ops)), med, xerr=err, capsize=3, color="tab:gray")
        ax.set_yticks(range(len(ops)), labels, fontsize=7)
        ax.invert_yaxis()
        if max(med) > 10 * min(med):
            ax.set_xscale("log")
        for i, m in enumerate(med):
            ax.text(m, i, f" {m:.3g}" if m < 100 else f" {m:.0f}", va="center", fontsize=6)
    ax.set_xlabel("ms per call (median, 20-80% whiskers)")
    ax.set_title("single operations", fontsize=9)
    ax = axes[1]
    if train:
        ns = sorted({r.steps for r in train})
        series = sorted({_series_key(r) for r in train})
        width = 0.8 / len(series)
        for i, key in enumerate(series):
            points = {r.steps: r for r in train if _series_key(r) == key}
            xs = [j + i * width for j, n in enumerate(ns) if n in points]
            row = next(iter(points.values()))
            ax.bar(xs, [points[n].images_per_s for n in ns if n in points], width, label=_label(row),
                   color=_ALGORITHM_COLORS.get(row.algorithm), alpha=0.55 + 0.45 * (i % 2))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ns))], [f"N={n}" for n in ns])
        ax.set_ylim(0, 1.3 * max(r.images_per_s for r in train))  # room for the legend
        ax.legend(fontsize=7, ncol=min(4, len(series)), loc="upper right")
    ax.set_ylabel("images / s (training iteration)")
    ax.set_title("training iteration: forward N steps, loss, penalty, backward", fontsize=9)
    first = rows[0]
    fig.suptitle(f"Speed: {first.device_name}, {first.shape_id}, {first.threads} thread(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(rows: list[Record], out_dir: Path) -> list[Path]:
    """The PNGs of every group of ``rows`` (latest run per configuration) in ``out_dir``."""
    written = []
    for (device, shape_id, _), group in groups(latest(rows)).items():
        stem = Path(out_dir) / f"{device_slug(device)}_{shape_id}"
        for suffix, draw in (("memory", plot_memory), ("speed", plot_speed)):
            path = stem.with_name(f"{stem.name}_{suffix}.png")
            if draw(group, path):
                written.append(path)
    return written


__all__ = ["latest", "groups", "markdown", "memory_table", "plot_memory", "plot_speed", "speed_table", "write_plots"]
