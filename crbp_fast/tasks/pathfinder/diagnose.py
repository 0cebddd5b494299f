"""``crbp-fast diagnose``: does a trained hGRU stay at a fixed point past its training N? (Figure 1)

For each checkpoint, the model runs T steps from h0 = 0 on a held-out batch, step by step and
without a graph, and this writes to ``--out``:

(a) ``metric_vs_step.png``: the held-out metric at every step t = 1..T (F1 for segmentation,
    balanced accuracy for classification; all metrics are in the JSON);
(b) ``state_space.png``: Figure 1a: the hidden states of a few images, spatially pooled and
    projected on their top-2 principal components, t <= N and t > N in two colours, with one
    image's trajectory drawn through them;
(c) ``distances.png``: ||h_T - h_N|| per image, and with two or more checkpoints a two-sample
    Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) between each pair's distances;
(d) ``forward_trace.png``: the relative residual ||h_t - h_{t-1}|| / ||h_t|| at every step of the
    first batch (``fixed_point(..., trace=True)``; :func:`plot_trace`);
``training_loss.png`` from the ``log.jsonl`` beside each checkpoint (when there is one), and
``summary.json`` with all the numbers.

Any cell of the Pathfinder model works: the hGRU, or a standard cell (``--cell convgru`` /
``convlstm`` at training); for a cell whose state is a tuple (a ConvLSTM's (h, c)) the metric,
the PCA and the distances use h, the tensor the readout reads (:func:`crbp_fast.engine.state.primary`).

A stable (contractive) model has small distances and a flat metric past N; a BPTT-trained one
typically drifts away and its metric falls (the paper: ~0.2 F1 by step 50 on PF14).

Example:
    crbp-fast diagnose runs/pf14_bptt/checkpoint.pt runs/pf14_crbp/checkpoint.pt --test-steps 40 --out diag/
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import EVAL_INDEX_OFFSET, PathfinderDataset
from .generator import DEFAULT_CONFIG, PathfinderConfig, PathfinderError, check_length
from .metrics import METRICS, confusion, scores
from .model import PathfinderHGRU
from .published import PUBLISHED_FORMAT, PublishedCheckpointError
from ...engine.fixed_point import fixed_point
from ...engine.state import primary
from ...engine.trace import plot_trace
from .train import CheckpointError, build_model, load_model_state, read_checkpoint

#: Image side of the published Pathfinder runs (their checkpoints do not record it).
PUBLISHED_SIZE = 150

#: Pooled side of the states entering the PCA (keeps C x side^2 features per state small).
PCA_SIDE = 16


class DiagnoseError(ValueError):
    """Arguments of a diagnosis out of range (the message names the argument)."""


@dataclass
class Diagnosis:
    """What :func:`diagnose_checkpoint` measured for one checkpoint."""

    label: str
    path: str
    config: dict
    train_steps: int
    metric: str
    per_step: dict[str, list[float]]  # metric name -> value at t = 1..T
    distances: np.ndarray  # ||h_T - h_N|| per image
    relative_distances: np.ndarray  # ||h_T - h_N|| / ||h_N|| per image
    pca: np.ndarray  # (T, P, 2) projected pooled states of P images
    explained_variance: list[float]
    forward_trace: list[list[float]]  # (T, B) relative residual per step of the first batch


def load_checkpoint_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", *, train_steps: int | None = None,
    length: int | None = None,
) -> tuple[PathfinderHGRU, dict]:
    """The model of a ``crbp-fast train`` checkpoint, in eval mode, and the checkpoint's config.

    A checkpoint of the published Pathfinder training script is accepted too: it records no
    config, so ``train_steps`` (N) and ``length`` (the contour length it was trained on) must be
    given; the returned config describes it (``algorithm`` "published", 150 x 150 images, data
    seed 0).

    Raises:
        CheckpointError: unreadable file, another format, or parameters that do not fit the
            model its config describes (the message names the parameter and both shapes).
        DiagnoseError: a published checkpoint without ``train_steps`` or ``length``.
    """
    ckpt = read_checkpoint(path, published=True)
    if ckpt["format"] == PUBLISHED_FORMAT:
        return _published_model(ckpt, path, device, train_steps, length)
    config = ckpt["config"]
    try:
        model = build_model(config)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: its config does not describe a model: {err!r}") from None
    load_model_state(model, ckpt["model"], f"checkpoint {path}", config)
    return model.to(device).eval(), config


def _published_model(ckpt: dict, path, device, train_steps: int | None, length: int | None):
    for arg, flag, value in (("train_steps", "--train-steps", train_steps), ("length", "--length", length)):
        if value is None:
            raise DiagnoseError(
                f"{arg}: checkpoint {path} is a published checkpoint, which does not record it; pass {flag}")
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 1:
        raise DiagnoseError(f"train_steps: expected an int >= 1, got {train_steps!r}")
    try:
        model = PathfinderHGRU.from_published(ckpt, steps=train_steps)
    except (PublishedCheckpointError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    config = {
        # The published code has one adjoint rule and one focal loss: describe the run by them.
        **model.config, "algorithm": "published", "adjoint_rule": "published", "focal_variant": "published",
        "length": length, "size": PUBLISHED_SIZE, "seed": 0,
        "generator": asdict(DEFAULT_CONFIG), "epoch": ckpt["epoch"], "best_prec1": ckpt["best_prec1"],
    }
    return model.to(device).eval(), config


@torch.no_grad()
def diagnose_checkpoint(
    path: str | os.PathLike, *, test_steps: int, train_steps: int | None = None, n_images: int = 64,
    batch_size: int = 16, length: int | None = None, pca_images: int = 8, label: str | None = None,
    device: torch.device | str = "cpu",
) -> Diagnosis:
    """Run one checkpoint's model for ``test_steps`` steps on held-out images and measure it.

    Args:
        path: a ``crbp-fast train`` checkpoint, or one of the published training script (then
            ``train_steps`` and ``length`` are required; see :func:`load_checkpoint_model`).
        test_steps: T.
        train_steps: N (default: the checkpoint's training steps); must be below T.
        n_images: held-out images (indices from ``EVAL_INDEX_OFFSET`` of the checkpoint's data
            seed, so never training images).
        batch_size: images per forward pass (the normalisation uses batch statistics).
        length: contour length of the test images (default: the training length).
        pca_images: images (from the first batch) whose states enter the PCA.
        label: the name in plots (default: the checkpoint's directory name).
        device: where to run.
    """
    model, config = load_checkpoint_model(path, device, train_steps=train_steps, length=length)
    n = config["steps"] if train_steps is None else train_steps
    if not 1 <= n < test_steps:
        raise DiagnoseError(f"train_steps: expected 1 <= N < test_steps={test_steps}, got N={n}")
    if length is None:
        length = config["length"]
    else:
        try:
            length = check_length(length)
        except ValueError as err:
            raise DiagnoseError(str(err)) from None
    data = PathfinderDataset(
        config["task"], length, config["size"], config["seed"], n_images, start=EVAL_INDEX_OFFSET,
        config=PathfinderConfig(**config["generator"]),
    )
    counts = torch.zeros(test_steps, 4, dtype=torch.int64)
    distances, relative, pooled = [], [], []
    forward_trace = None
    for lo in range(0, n_images, batch_size):
        batch = [data[i] for i in range(lo, min(lo + batch_size, n_images))]
        images = torch.stack([b[0] for b in batch]).to(device)
        target = torch.stack([b[1] for b in batch]).to(device)
        if lo == 0:
            res = fixed_point(model.cell, model.drive(images), steps=test_steps, trace=True)
            forward_trace = res.stats.trace.forward.tolist()
        h_n = None
        for t, state in enumerate(model.trajectory(images, test_steps), start=1):
            h = primary(state)
            counts[t - 1] += confusion(model.head(h).argmax(1), target).cpu()
            if t == n:
                h_n = h
            if lo == 0:
                side = max(1, math.ceil(h.shape[-1] / PCA_SIDE))
                pooled.append(F.avg_pool2d(h[:pca_images], side, ceil_mode=True).flatten(1).double().cpu())
        diff = (h - h_n).flatten(1).norm(dim=1)
        distances.append(diff.cpu())
        relative.append((diff / h_n.flatten(1).norm(dim=1).clamp_min(1e-12)).cpu())
    per_step = {name: [] for name in METRICS}
    for t in range(test_steps):
        for name, value in scores(counts[t]).items():
            per_step[name].append(value)
    states = torch.stack(pooled)  # (T, P, D)
    flat = states.reshape(-1, states.shape[-1])
    flat = flat - flat.mean(0)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)
    projected = (flat @ vh[:2].T).reshape(states.shape[0], states.shape[1], -1)
    total = float(s.pow(2).sum())
    explained = [float(v) / total if total > 0 else 0.0 for v in s[:2].pow(2)]
    return Diagnosis(
        label=label or Path(path).resolve().parent.name, path=str(path), config=config, train_steps=n,
        metric="f1" if config["task"] == "segmentation" else "balanced_accuracy", per_step=per_step,
        distances=torch.cat(distances).numpy(), relative_distances=torch.cat(relative).numpy(),
        pca=projected.numpy(), explained_variance=explained, forward_trace=forward_trace,
    )


def training_log(checkpoint: str | os.PathLike) -> list[dict]:
    """The records of the ``log.jsonl`` beside a checkpoint (empty when there is none)."""
    path = Path(checkpoint).parent / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def ks_tests(diagnoses: list[Diagnosis]) -> list[dict]:
    """Two-sample KS test between the ||h_T - h_N|| of every pair of checkpoints."""
    from scipy.stats import ks_2samp

    out = []
    for a, b in itertools.combinations(diagnoses, 2):
        res = ks_2samp(a.distances, b.distances)
        out.append({"a": a.label, "b": b.label, "statistic": float(res.statistic), "pvalue": float(res.pvalue),
                    "n_a": int(len(a.distances)), "n_b": int(len(b.distances))})
    return out


def _training_summary(records: list[dict]) -> dict:
    """First and last training loss (means of the first and last tenth) and the last evaluation."""
    rows = [r["loss"] for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not rows:
        return {}
    tenth = max(1, len(rows) // 10)
    return {
        "steps": len(rows), "first_loss": rows[0], "last_loss": rows[-1],
        "first_tenth_mean_loss": float(np.mean(rows[:tenth])), "last_tenth_mean_loss": float(np.mean(rows[-tenth:])),
        "last_eval": {k: v for k, v in evals[-1].items() if k not in ("kind", "seconds")} if evals else None,
    }


def plot_summary(summary: dict, out: str | os.PathLike) -> list[Path]:
    """Draw the PNGs of a :func:`diagnose` summary (as stored in ``summary.json``) into ``out``.

    The training-loss plot reads the ``log.jsonl`` beside each checkpoint, when it is there.
    Returns the paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    entries, test_steps, ks = summary["checkpoints"], summary["test_steps"], summary["ks"]
    paths = []

    def save(fig, name: str) -> None:
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    def name(e: dict) -> str:
        return f"{e['label']} ({e['algorithm']}, N={e['train_steps']})"

    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P"]

    def style(i: int) -> dict:
        """Colour, line style and marker of curve i: curves that coincide stay distinguishable."""
        return {"color": f"C{i}", "linestyle": styles[i % len(styles)], "marker": markers[i % len(markers)]}

    steps = np.arange(1, test_steps + 1)
    metric_names = sorted({e["metric"] for e in entries})
    panels = metric_names + (["iou"] if all(e["task"] == "segmentation" for e in entries) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    every = max(1, test_steps // 10)
    for ax, metric in zip(axes[0], panels):
        for i, e in enumerate(entries):
            st = style(i)
            # markers at offset steps per curve, so that coinciding curves still show each one's marks
            ax.plot(steps, e["per_step"][metric], color=st["color"], linestyle=st["linestyle"], linewidth=1.6,
                    marker=st["marker"], markevery=(i % every, every), markersize=5, markerfacecolor="none",
                    label=name(e))
            ax.axvline(e["train_steps"], color=st["color"], linestyle=":", linewidth=1)
        ax.set_xlabel("step t (recurrent iterations from h0 = 0)")
        ax.set_ylabel(f"held-out {metric} (pooled over pixels)" if metric in ("f1", "iou") else f"held-out {metric}")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0.5, test_steps + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="gray", linestyle=":", linewidth=1))
        labels.append("training N (vertical, in the model's colour)")
        ax.legend(handles, labels, fontsize=7, loc="lower right")
        ax.set_title(f"held-out {metric} at every step, {summary['n_images']} images", fontsize=9)
    save(fig, "metric_vs_step.png")

    fig, axes = plt.subplots(1, len(entries), figsize=(4.3 * len(entries) + 1.2, 5.0), squeeze=False,
                             layout="constrained")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    norm = Normalize(1, test_steps)
    for ax, e in zip(axes[0], entries):
        pts, n = np.asarray(e["pca"]["points"]), e["train_steps"]  # (T, P, 2)
        t_of = np.repeat(np.arange(1, pts.shape[0] + 1), pts.shape[1])
        flat = pts.reshape(-1, 2)
        ax.scatter(flat[:, 0], flat[:, 1], c=t_of, cmap="viridis", norm=norm, s=10, alpha=0.7)
        ax.plot(pts[:, 0, 0], pts[:, 0, 1], color="black", linewidth=0.9)
        ax.scatter(pts[0, 0, 0], pts[0, 0, 1], marker="o", facecolor="none", edgecolor="black", s=60, zorder=3)
        ax.scatter(pts[n - 1, :, 0], pts[n - 1, :, 1], marker="*", color="tab:red", s=70, zorder=3,
                   edgecolor="black", linewidth=0.4)
        ax.scatter(pts[-1, 0, 0], pts[-1, 0, 1], marker="X", color="black", s=60, zorder=3)
        ev = e["pca"]["explained_variance"]
        ax.set_xlabel(f"PC1 of the pooled state ({ev[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else "PC2")
        ax.set_title(name(e), fontsize=9)
    same_n = len({e["train_steps"] for e in entries}) == 1
    n_text = f"t = N = {entries[0]['train_steps']}" if same_n else "t = N (each model's training steps, in its title)"
    legend = [
        Line2D([], [], marker="o", linestyle="", color="gray", markersize=4,
               label=f"state h_t of one of {pts.shape[1]} held-out images (colour: step t)"),
        Line2D([], [], color="black", linewidth=0.9, label="trajectory of image 1 through t = 1 .. T"),
        Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="black", markersize=7,
               label="image 1 at t = 1"),
        Line2D([], [], marker="*", linestyle="", color="tab:red", markeredgecolor="black", markersize=9,
               label=f"every image at {n_text}"),
        Line2D([], [], marker="X", linestyle="", color="black", markersize=7, label=f"image 1 at t = T = {test_steps}"),
    ]
    fig.legend(handles=legend, fontsize=7.5, loc="outside lower center", ncols=3)
    fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=list(axes[0]), label="step t", shrink=0.9)
    fig.suptitle("state space: hidden states (spatially pooled) projected on their top-2 principal components "
                 "(PCA per model)", fontsize=9)
    paths.append(out / "state_space.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    # Top row: one histogram per model, each with 30 bins over its own range (the models' distances
    # differ by orders of magnitude while one model's spread can be ~1% of its mean, so shared bins
    # put a model's images in one bin). Bottom: the empirical CDFs on one log axis, whose largest
    # vertical gap is the KS statistic.
    values = [np.asarray(e["distance"]["values"], dtype=float) for e in entries]
    fig = plt.figure(figsize=(max(12.0, 3.6 * len(entries)), 8.2), layout="constrained")
    grid = fig.add_gridspec(2, len(entries), height_ratios=[1, 1.25])
    for i, (e, v) in enumerate(zip(entries, values)):
        ax = fig.add_subplot(grid[0, i])
        st = style(i)
        lo, hi = float(v.min()), float(v.max())
        span = hi - lo if hi > lo else max(abs(lo), 1.0) * 1e-3
        bins = np.linspace(lo - 0.02 * span, hi + 0.02 * span, 31)
        ax.hist(v, bins=bins, color=st["color"], alpha=0.35, edgecolor=st["color"], linewidth=0.8)
        ax.set_title(f"{name(e)}\nn = {len(v)}, median {np.median(v):.3g}", fontsize=8)
        ax.set_xlabel("||h_T - h_N|| (30 bins over this model's range)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if i == 0:
            ax.set_ylabel("images per bin")
    axes = [None, fig.add_subplot(grid[1, :])]
    ax = axes[1]
    for i, (e, v) in enumerate(zip(entries, values)):
        st = style(i)
        xs = np.sort(v)
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", color=st["color"], linestyle=st["linestyle"],
                linewidth=1.6, label=name(e))
    ax.set_xscale("log")
    ax.set_xlabel(f"||h_T - h_N|| per held-out image (T = {test_steps}; L2 norm over C x H x W; log scale)")
    ax.set_ylabel("fraction of images with distance <= x")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("empirical CDFs (the KS statistic D is their largest vertical gap)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if ks:
        lines = [f"KS {k['a']} vs {k['b']}: D = {k['statistic']:.3f}, p = {k['pvalue']:.2g}, "
                 f"n = {k.get('n_a', '?')} / {k.get('n_b', '?')}" for k in ks]
        ax.text(0.01, 0.98, "two-sample Kolmogorov-Smirnov tests:\n" + "\n".join(lines), fontsize=7,
                va="top", ha="left", family="monospace", transform=ax.transAxes,
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    fig.suptitle("distance between the states at t = N and t = T, per held-out image", fontsize=10)
    paths.append(out / "distances.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    if all("forward_trace" in e for e in entries):
        paths.append(plot_trace({name(e): {"forward": e["forward_trace"]} for e in entries},
                                out / "forward_trace.png", title="forward residual per step (first batch)"))

    logs = [training_log(e["path"]) for e in entries]
    if any(logs):
        shown = [(i, e, [r for r in records if r.get("kind") == "train"]) for i, (e, records) in
                 enumerate(zip(entries, logs))]
        shown = [s for s in shown if s[2]]
        fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.3), squeeze=False, sharey=True,
                                 layout="constrained")
        for ax, (i, e, rows) in zip(axes[0], shown):
            step = np.array([r["step"] for r in rows])
            loss = np.array([r["loss"] for r in rows])
            window = max(1, len(rows) // 20)
            if window > 1:
                ax.plot(step, loss, color=f"C{i}", alpha=0.45, linewidth=0.7, label="every logged step")
                ax.plot(step[window - 1:], _moving_average(loss, window), color="black", linewidth=1.4,
                        label=f"moving average of {window} steps")
            else:  # too few steps to average: the raw curve alone, drawn in full
                ax.plot(step, loss, color=f"C{i}", linewidth=1.4, marker="o", markersize=3, label="every logged step")
            evals = [r for r in records_of(e, logs, entries) if r.get("kind") == "eval"]
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_yscale("log")
            ax.set_title(f"{e['label']} ({e['algorithm']}, N={e['trained_steps']})", fontsize=9)
            ax.grid(alpha=0.3)
            if evals:
                ax2 = ax.twinx()
                ax2.plot([r["step"] for r in evals], [r.get("f1", np.nan) for r in evals], "o--", color="tab:green",
                         markersize=4, linewidth=1, label="held-out F1 (right axis)")
                ax2.set_ylim(0, 1.02)
                ax2.tick_params(labelsize=7)
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2)
            else:
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2)
        axes[0, 0].set_ylabel("training loss (focal + LCP weight x penalty)")
        save(fig, "training_loss.png")
    return paths


def records_of(e: dict, logs: list[list[dict]], entries: list[dict]) -> list[dict]:
    """The log records of entry ``e`` (by position in ``entries``)."""
    return logs[entries.index(e)]


def diagnose(
    checkpoints: list[str], *, test_steps: int, out: str | os.PathLike, train_steps: int | None = None,
    n_images: int = 64, batch_size: int = 16, length: int | None = None, pca_images: int = 8,
    labels: list[str] | None = None, device: str = "auto",
) -> dict:
    """Diagnose every checkpoint, write ``summary.json`` and its PNGs under ``out``; returns the summary.

    See :func:`diagnose_checkpoint` for the arguments (``device="auto"``: CUDA when available);
    :func:`plot_summary` draws the PNGs.
    """
    if not checkpoints:
        raise DiagnoseError("checkpoints: expected at least one checkpoint path, got none")
    if isinstance(test_steps, bool) or not isinstance(test_steps, int) or test_steps < 2:
        raise DiagnoseError(f"test_steps: expected an int >= 2, got {test_steps!r}")
    for arg, value in (("n_images", n_images), ("batch_size", batch_size), ("pca_images", pca_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DiagnoseError(f"{arg}: expected an int >= 1, got {value!r}")
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise DiagnoseError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DiagnoseError(f"device: {device!r} was asked for but torch sees no CUDA device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if labels is not None and len(labels) != len(checkpoints):
        raise DiagnoseError(f"labels: expected one per checkpoint ({len(checkpoints)}), got {len(labels)}")
    names = labels or [Path(c).resolve().parent.name for c in checkpoints]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    diagnoses = [
        diagnose_checkpoint(
            c, test_steps=test_steps, train_steps=train_steps, n_images=n_images, batch_size=batch_size,
            length=length, pca_images=pca_images, label=n, device=device,
        )
        for c, n in zip(checkpoints, names)
    ]
    summary = {
        "test_steps": test_steps, "n_images": n_images, "batch_size": batch_size,
        "checkpoints": [
            {
                "label": d.label, "path": d.path, "algorithm": d.config["algorithm"], "task": d.config["task"],
                "trained_steps": d.config["steps"], "train_length": d.config["length"],
                "test_length": length or d.config["length"], "train_steps": d.train_steps, "metric": d.metric,
                "per_step": d.per_step,
                "metric_at_N": d.per_step[d.metric][d.train_steps - 1], "metric_at_T": d.per_step[d.metric][-1],
                "distance": {
                    "mean": float(d.distances.mean()), "median": float(np.median(d.distances)),
                    "max": float(d.distances.max()), "relative_median": float(np.median(d.relative_distances)),
                    "values": d.distances.tolist(),
                },
                "pca": {"explained_variance": d.explained_variance, "points": d.pca.tolist()},
                "cell": d.config.get("cell", "hgru"), "forward_trace": d.forward_trace,
                "training": _training_summary(training_log(d.path)),
            }
            for d in diagnoses
        ],
        "ks": ks_tests(diagnoses),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary["plots"] = [p.name for p in plot_summary(summary, out)]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add ``crbp-fast diagnose``."""
    from ...cli import DefaultsHelpFormatter

    p = subparsers.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0],
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoint.pt files of `crbp-fast train`, or of the published Pathfinder training script "
                        "(which need --train-steps and --length)")
    p.add_argument("--train-steps", type=int, default=None, help="N (default: each checkpoint's training steps)")
    p.add_argument("--test-steps", type=int, required=True, help="T, the steps to run")
    p.add_argument("--out", required=True, help="directory for the PNGs and summary.json")
    p.add_argument("--n-images", type=int, default=64, help="held-out images")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--length", type=int, default=None, help="contour length of the test images (default: trained)")
    p.add_argument("--pca-images", type=int, default=8, help="images whose states enter the PCA")
    p.add_argument("--labels", nargs="+", default=None, help="names in the plots, one per checkpoint")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ...cli import CLIError

    try:
        summary = diagnose(
            args.checkpoints, test_steps=args.test_steps, out=args.out, train_steps=args.train_steps,
            n_images=args.n_images, batch_size=args.batch_size, length=args.length, pca_images=args.pca_images,
            labels=args.labels, device=args.device,
        )
    except (CheckpointError, DiagnoseError, PathfinderError) as err:
        raise CLIError(str(err)) from None
    for c in summary["checkpoints"]:
        print(f"{c['label']}: {c['metric']} {c['metric_at_N']:.3f} at N={c['train_steps']}, "
              f"{c['metric_at_T']:.3f} at T={summary['test_steps']}; "
              f"median ||h_T - h_N|| {c['distance']['median']:.3g}")
    for k in summary["ks"]:
        print(f"KS {k['a']} vs {k['b']}: D={k['statistic']:.3f}, p={k['pvalue']:.3g}")
    print(f"wrote {args.out}")
    return 0
