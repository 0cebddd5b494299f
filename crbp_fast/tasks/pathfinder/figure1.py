"""``crbp-fast figure1``: the paper's Figure 1 at CPU scale, end to end, by one command.

Stages (each resumes where an interrupted run stopped; rerun the same command):

1. data: ``OUT/data``, a ``crbp-fast pathfinder generate`` directory of ``--train-images``
   segmentation images (kept when it is already there and matches).
2. train: one ``crbp-fast train`` process per model (``--models``, default BPTT-6, C-BPTT-6,
   C-RBP-20, RBP-20), ``--parallel`` at a time with ``--threads`` torch threads each, into
   ``OUT/runs/<model>/`` (checkpoint, log.jsonl, config.json, train.out). Every model trains on
   the same data, the same batches in the same order, the same initial weights (one seed), the
   same batch size and the same number of optimizer steps; only the algorithm and N differ. An
   interrupted run continues from the trainer's checkpoints (``--resume``, exact).
3. evaluate: ``crbp-fast diagnose`` of every checkpoint on ``--eval-images`` held-out images
   (the disjoint index range of the generator), run from h0 = 0 to ``--test-steps`` T: F1 and
   IoU at every step, ||h_T - h_N|| per image with two-sample KS tests, the state-space PCA;
   plus the predicted segmentation of one held-out image (the first) at every step.
4. figures and ``OUT/summary.json``: ``state_space.png`` (Figure 1a), ``segmentations.png``
   (1b), ``distances.png`` (1c), ``metric_vs_step.png`` (F1 / IoU per step), ``training_loss.png``,
   ``forward_trace.png`` (the forward residual per step of each model).

Progress: a tqdm bar of optimizer steps (``--no-progress`` hides it) and, every
``--report-every`` seconds, one plain line per stage on stdout (for logs of background runs).
SIGINT / SIGTERM stop the trainers after their running step (each writes its checkpoint) and exit 130.

Example:
    nohup crbp-fast figure1 --out runs/figure1 --no-progress > runs/figure1.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .dataset import EVAL_INDEX_OFFSET, PathfinderDataset, ShardedPathfinder, write_shards
from .diagnose import diagnose, load_checkpoint_model
from .metrics import confusion, scores
from .train import read_checkpoint

#: The paper's Figure 1 numbers (F1 per step, Pathfinder-14 segmentation, 150 x 150, run to 40 steps).
PAPER = {
    "bptt6": {"algorithm": "bptt", "N": 6, "f1": {"6": 0.9907, "39": 0.2297}},
    "cbptt6": {"algorithm": "cbptt", "N": 6, "f1": {"6": 0.9875, "39": 0.8633}},
    "crbp20": {"algorithm": "crbp", "N": 20, "f1": {"24": 0.9869, "39": 0.9822}},
}
SUMMARY_FORMAT = "crbp_fast.figure1/1"
#: Settings that may change when a folder is run again: more optimizer steps continue the trainers
#: (as ``crbp-fast train --resume`` allows), other models are added, the evaluation is redone.
RESUMABLE = ("models", "iterations", "threads", "eval_images", "eval_batch", "test_steps", "pca_images",
             "train_eval_every", "train_eval_images", "checkpoint_every", "device", "evaluate_only")
ALGORITHM_NAMES = {"bptt": "BPTT", "cbptt": "C-BPTT", "rbp": "RBP", "crbp": "C-RBP"}


class Figure1Error(ValueError):
    """An argument out of range, or a stage that failed (the message names it)."""


@dataclass
class Figure1Config:
    """The reduced Figure 1 experiment (defaults: the CPU-scale setting in docs/results/figure1_cpu)."""

    out: str = "runs/figure1"
    models: tuple[str, ...] = ("bptt:6", "cbptt:6", "crbp:20", "rbp:20")
    size: int = 32
    length: int = 4
    seed: int = 0
    train_images: int = 10000
    channels: int = 8
    kernel_size: int = 5
    batch_size: int = 16
    iterations: int = 6000
    lr: float = 3e-3
    lcp_weight: float = 10.0
    lcp_target: float = 0.9
    adjoint_steps: int = 15
    adjoint_rule: str = "relative"
    backend: str = "auto"
    conv: str = "auto"
    eval_images: int = 256
    eval_batch: int = 16
    test_steps: int = 40
    pca_images: int = 16
    train_eval_every: int = 500
    train_eval_images: int = 128
    checkpoint_every: int = 100
    parallel: int = 4
    threads: int = 1
    data_workers: int = 2
    device: str = "auto"
    evaluate_only: bool = False
    progress: bool = True
    report_every: float = 60.0
    extra_train_args: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        for name in ("size", "length", "train_images", "channels", "kernel_size", "batch_size", "iterations",
                     "eval_images", "eval_batch", "test_steps", "pca_images", "parallel", "threads", "data_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Figure1Error(f"{name}: expected an int >= 1, got {value!r}")
        if self.train_images < self.batch_size:
            raise Figure1Error(f"train_images: {self.train_images} is fewer than one batch of {self.batch_size}")
        specs = [parse_model(m) for m in self.models]
        if not specs:
            raise Figure1Error("models: expected at least one model such as bptt:6")
        names = [s[0] for s in specs]
        if len(set(names)) < len(names):
            raise Figure1Error(f"models: each model once, got {list(self.models)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise Figure1Error(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name, _, steps in specs:
            if steps >= self.test_steps:
                raise Figure1Error(f"models: {name} trains at N={steps}, which must be below test_steps={self.test_steps}")


def parse_model(spec: str) -> tuple[str, str, int]:
    """``"crbp:20"`` -> ``("crbp20", "crbp", 20)`` (name, algorithm, N)."""
    algorithm, sep, steps = str(spec).partition(":")
    if not sep or algorithm not in ALGORITHM_NAMES or not steps.isdigit() or int(steps) < 1:
        raise Figure1Error(f"models: expected ALGORITHM:N with ALGORITHM one of {tuple(ALGORITHM_NAMES)}, got {spec!r}")
    return f"{algorithm}{int(steps)}", algorithm, int(steps)


def pretty(algorithm: str, steps: int) -> str:
    return f"{ALGORITHM_NAMES[algorithm]}-{steps}"


# --- stage 1: data ------------------------------------------------------------------------------


def ensure_data(config: Figure1Config, log) -> Path:
    root = Path(config.out) / "data"
    if (root / "index.json").exists():
        ds = ShardedPathfinder(root)
        want = {"task": "segmentation", "length": config.length, "size": config.size, "seed": config.seed,
                "n": config.train_images}
        have = {"task": ds.task, "length": ds.length, "size": ds.size, "seed": ds.seed, "n": ds.n}
        if have != want:
            raise Figure1Error(f"out: {root} holds other data ({have}) than asked for ({want}); choose another --out")
        log(f"data: {root} exists ({ds.n} images), kept")
        return root
    if root.exists():  # an interrupted generation: shards without an index; start it again
        for p in root.iterdir():
            p.unlink()
    t0 = time.perf_counter()
    write_shards(root, config.train_images, "segmentation", config.length, config.size, config.seed,
                 shard_size=max(1, -(-config.train_images // (4 * config.data_workers))),
                 workers=config.data_workers, progress=config.progress)
    log(f"data: wrote {config.train_images} images ({config.size}x{config.size}, length {config.length}) "
        f"to {root} in {time.perf_counter() - t0:.0f} s")
    return root


# --- stage 2: training --------------------------------------------------------------------------


def train_command(config: Figure1Config, data: Path, name: str, algorithm: str, steps: int) -> list[str]:
    out = Path(config.out) / "runs" / name
    return [
        sys.executable, "-m", "crbp_fast.cli", "train", "--data", str(data), "--algorithm", algorithm,
        "--steps", str(steps), "--iterations", str(config.iterations), "--batch-size", str(config.batch_size),
        "--lr", repr(config.lr), "--channels", str(config.channels), "--kernel-size", str(config.kernel_size),
        "--lcp-weight", repr(config.lcp_weight), "--lcp-target", repr(config.lcp_target),
        "--adjoint-steps", str(config.adjoint_steps), "--adjoint-rule", config.adjoint_rule,
        "--backend", config.backend, "--conv", config.conv,
        "--eval-size", str(config.train_eval_images), "--eval-every", str(config.train_eval_every),
        "--checkpoint-every", str(config.checkpoint_every), "--threads", str(config.threads),
        "--device", config.device, "--no-progress", "--resume", "--out", str(out), *config.extra_train_args,
    ]


def _checkpoint_step(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        return int(read_checkpoint(path)["step"])
    except Exception:  # a checkpoint the trainer itself will judge (and name) when it resumes
        return 0


def _last_step(log_path: Path) -> tuple[int, float]:
    """(step, elapsed seconds) of the last training record of a log.jsonl (0, 0 when none)."""
    if not log_path.exists():
        return 0, 0.0
    with open(log_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") == "train":
            return int(r["step"]), float(r.get("elapsed", 0.0))
    return 0, 0.0


class _Stop:
    """SIGINT / SIGTERM: remember it, so that the trainers are stopped and the command exits 130."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def run_training(config: Figure1Config, data: Path, log) -> dict[str, dict]:
    """Train every model (``parallel`` processes at a time); returns per model its wall seconds and status."""
    runs = Path(config.out) / "runs"
    specs = [parse_model(m) for m in config.models]
    info: dict[str, dict] = {}
    todo = []
    for name, algorithm, steps in specs:
        ckpt = runs / name / "checkpoint.pt"
        done = _checkpoint_step(ckpt)
        info[name] = {"algorithm": algorithm, "N": steps, "start_step": done}
        if done >= config.iterations:
            log(f"train: {name} already at step {done} of {config.iterations}, kept")
        else:
            todo.append((name, algorithm, steps))
    if not todo:
        return info
    from tqdm.auto import tqdm

    total = len(specs) * config.iterations
    bar = tqdm(total=total, initial=sum(min(i["start_step"], config.iterations) for i in info.values()),
               unit="step", desc="figure1 train", disable=not config.progress, dynamic_ncols=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads), "MKL_NUM_THREADS": str(config.threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                       os.environ.get("PYTHONPATH")]))
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    pending = list(todo)
    t_start = time.perf_counter()
    last_report = -1e9
    shown = bar.n
    failed: list[str] = []
    signalled: set[str] = set()
    with _Stop() as stop:
        while pending or running:
            while pending and len(running) < config.parallel and not stop.requested:
                name, algorithm, steps = pending.pop(0)
                (runs / name).mkdir(parents=True, exist_ok=True)
                out_file = open(runs / name / "train.out", "a")
                cmd = train_command(config, data, name, algorithm, steps)
                out_file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
                out_file.flush()
                # Own process group: a Ctrl-C of the terminal reaches this process only, which
                # forwards one SIGTERM, so each trainer checkpoints exactly once.
                proc = subprocess.Popen(cmd, stdout=out_file, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                running[name] = (proc, time.perf_counter(), out_file)
                log(f"train: started {name} ({pretty(algorithm, steps)}), pid {proc.pid}, log {runs / name}/train.out")
            time.sleep(1.0)
            if stop.requested:
                # once per trainer: a second SIGTERM after its handler is gone would kill its shutdown
                for name, (proc, _, _) in running.items():
                    if proc.poll() is None and name not in signalled:
                        proc.send_signal(signal.SIGTERM)
                        signalled.add(name)
            for name in list(running):
                proc, t0, out_file = running[name]
                if proc.poll() is None:
                    continue
                out_file.close()
                del running[name]
                info[name]["seconds"] = time.perf_counter() - t0
                info[name]["returncode"] = proc.returncode
                if proc.returncode != 0:
                    if not stop.requested:
                        failed.append(name)
                    why = " (stopped on request; its checkpoint is written)" if proc.returncode == 130 else ""
                    log(f"train: {name} exited {proc.returncode}{why} (see {runs / name}/train.out)")
                else:
                    log(f"train: {name} finished in {info[name]['seconds']:.0f} s")
            progress = {n: _last_step(runs / n / "log.jsonl")[0] for n, _, _ in specs}
            done_steps = sum(min(v, config.iterations) for v in progress.values())
            bar.update(done_steps - shown)
            shown = done_steps
            now = time.perf_counter()
            if now - last_report >= config.report_every:
                last_report = now
                elapsed = now - t_start
                rate = (done_steps - sum(min(i["start_step"], config.iterations) for i in info.values())) / max(elapsed, 1e-9)
                eta = (total - done_steps) / rate if rate > 0 else float("nan")
                parts = " ".join(f"{n} {progress[n]}/{config.iterations}" for n, _, _ in specs)
                log(f"train: {parts}; {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")
    bar.close()
    if stop.requested:
        raise KeyboardInterrupt
    if failed:
        tails = "; ".join(f"{n}: " + " | ".join((runs / n / "train.out").read_text().splitlines()[-3:]) for n in failed)
        raise Figure1Error(f"train: {', '.join(failed)} failed: {tails}")
    return info


# --- stage 3: evaluation ------------------------------------------------------------------------


@torch.no_grad()
def segmentation_over_time(checkpoint: Path, config: Figure1Config, device: str = "cpu") -> dict:
    """Predicted masks of the first held-out image at every step 1..T (in its evaluation batch).

    The normalisation uses batch statistics, so the image runs in the first evaluation batch, as
    in ``diagnose``. Returns the image, its mask, the prediction per step and its F1 per step.
    """
    model, cfg = load_checkpoint_model(checkpoint, device)
    data = PathfinderDataset("segmentation", cfg["length"], cfg["size"], cfg["seed"],
                             min(config.eval_batch, config.eval_images), start=EVAL_INDEX_OFFSET)
    images = torch.stack([data[i][0] for i in range(len(data))]).to(device)
    target = data[0][1].to(device)
    preds, f1 = [], []
    for h in model.trajectory(images, config.test_steps):
        pred = model.head(h).argmax(1)[0]
        preds.append(pred.to(torch.uint8).cpu().numpy())
        f1.append(scores(confusion(pred, target))["f1"])
    return {"image": images[0, 0].cpu().numpy(), "mask": target.cpu().numpy().astype(np.uint8), "pred": np.stack(preds), "f1": f1}


def plot_segmentations(frames: dict[str, dict], labels: dict[str, str], steps_n: dict[str, int], test_steps: int,
                       path: Path) -> Path:
    """Figure 1b: one row per model, the image with its true mask, then the prediction at chosen steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sorted({1, 3, *steps_n.values(), 10, 15, 25, 30, test_steps} & set(range(1, test_steps + 1)))
    rows, cols = len(frames), len(shown) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.55 * cols + 0.6, 1.85 * rows + 0.7), squeeze=False,
                             layout="constrained")
    for r, (name, fr) in enumerate(frames.items()):
        img = fr["image"]
        overlay = np.stack([img] * 3, axis=-1) * 0.6
        overlay[..., 0] = np.maximum(overlay[..., 0], fr["mask"].astype(float))
        ax = axes[r, 0]
        ax.imshow(overlay, interpolation="nearest")
        ax.set_title("image, true mask (red)" if r == 0 else "", fontsize=7)
        ax.set_ylabel(labels[name], fontsize=9)
        for c, t in enumerate(shown, start=1):
            ax = axes[r, c]
            pred = fr["pred"][t - 1].astype(float)
            # prediction white on the dimmed image; true-mask pixels the model missed in red
            rgb = np.stack([img * 0.35] * 3, axis=-1)
            rgb[pred > 0] = 1.0
            missed = (fr["mask"] > 0) & (pred == 0)
            rgb[missed] = (0.85, 0.1, 0.1)
            ax.imshow(rgb, interpolation="nearest")
            mark = " = N" if t == steps_n[name] else ""
            ax.set_title(f"t = {t}{mark}", fontsize=7, color="tab:blue" if mark else "black")
            ax.set_xlabel(f"F1 {fr['f1'][t - 1]:.2f}", fontsize=7, labelpad=1)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Figure 1b: predicted segmentation of one held-out image over steps t "
                 "(white: predicted contour; red: true contour pixels missed)", fontsize=8)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# --- the command --------------------------------------------------------------------------------


def run_figure1(config: Figure1Config, log=None) -> dict:
    """Run every stage (resuming), write the figures and ``summary.json`` under ``config.out``; return the summary."""
    config.check()
    if log is None:
        def log(msg: str) -> None:
            print(f"[figure1 {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()
                if k not in ("out", "progress", "report_every", "parallel", "data_workers")}
    if settings_path.exists():
        old = json.loads(settings_path.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items()
                   if k not in RESUMABLE
                   and old.get(k) != v}
        if changed:
            raise Figure1Error(f"out: {out} holds a run with other settings {changed} (old, new); choose another --out")
    settings_path.write_text(json.dumps(settings, indent=1) + "\n")
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    if config.evaluate_only:
        data = Path(config.out) / "data"
        info = {}
        log("evaluate only: the checkpoints as they are (training not continued)")
    else:
        data = ensure_data(config, log)
        timing.setdefault("data_seconds", time.perf_counter() - t0)
        t1 = time.perf_counter()
        try:
            info = run_training(config, data, log)
        finally:
            timing["train_wall_seconds"] = timing.get("train_wall_seconds", 0.0) + time.perf_counter() - t1
            timing_path.write_text(json.dumps(timing, indent=1) + "\n")
    timing.setdefault("data_seconds", 0.0)
    timing.setdefault("train_wall_seconds", 0.0)
    timing.setdefault("train", {})
    for name, i in info.items():
        if "seconds" in i:
            timing["train"][name] = timing["train"].get(name, 0.0) + i["seconds"]
    timing_path.write_text(json.dumps(timing, indent=1) + "\n")

    t2 = time.perf_counter()
    specs = [parse_model(m) for m in config.models]
    ckpts = [str(out / "runs" / name / "checkpoint.pt") for name, _, _ in specs]
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    log(f"evaluate: {len(specs)} models on {config.eval_images} held-out images to T = {config.test_steps}")
    diag = diagnose(ckpts, test_steps=config.test_steps, out=figures, n_images=config.eval_images,
                    batch_size=config.eval_batch, pca_images=config.pca_images,
                    labels=[pretty(a, n) for _, a, n in specs], device=device)
    frames = {name: segmentation_over_time(Path(c), config, device) for (name, _, _), c in zip(specs, ckpts)}
    plot_segmentations(frames, {name: pretty(a, n) for name, a, n in specs}, {name: n for name, _, n in specs},
                       config.test_steps, figures / "segmentations.png")
    timing["evaluate_seconds"] = time.perf_counter() - t2

    models = {}
    for (name, algorithm, steps), entry in zip(specs, diag["checkpoints"]):
        f1, iou = entry["per_step"]["f1"], entry["per_step"]["iou"]
        T = config.test_steps
        peak = int(np.argmax(f1))
        at = lambda t: f1[t - 1] if 1 <= t <= T else None  # noqa: E731
        models[name] = {
            "label": pretty(algorithm, steps), "algorithm": algorithm, "N": steps,
            "f1_per_step": f1, "iou_per_step": iou,
            "f1_at_N": at(steps), "iou_at_N": iou[steps - 1], "f1_peak": f1[peak], "f1_peak_step": peak + 1,
            "f1_at_24": at(24), "f1_at_39": at(39), "f1_at_T": f1[-1], "iou_at_T": iou[-1],
            "reaches_0.85_at_N": at(steps) >= 0.85,
            "distance": {k: v for k, v in entry["distance"].items() if k != "values"} | {
                "n": len(entry["distance"]["values"]), "values": entry["distance"]["values"]},
            "training": entry["training"],
            "train_seconds": timing["train"].get(name),
            "trained_optimizer_steps": int(read_checkpoint(out / "runs" / name / "checkpoint.pt")["step"]),
            "train_step_seconds": _last_step(out / "runs" / name / "log.jsonl")[1],
            "segmentation_image_f1_per_step": frames[name]["f1"],
        }
    labels = {pretty(a, n): name for name, a, n in specs}
    ks = [{**k, "a": labels.get(k["a"], k["a"]), "b": labels.get(k["b"], k["b"])} for k in diag["ks"]]
    timing_path.write_text(json.dumps(timing, indent=1) + "\n")
    wall = {
        "data_seconds": timing["data_seconds"], "train_wall_seconds": timing["train_wall_seconds"],
        "train_seconds_per_model": timing["train"], "evaluate_seconds": timing["evaluate_seconds"],
        "total_seconds": timing["data_seconds"] + timing["train_wall_seconds"] + timing["evaluate_seconds"],
        "note": "wall seconds summed over the sessions of this output folder (a resumed run adds up); "
                "per model: the wall time of its trainer process",
    }
    summary = {
        "format": SUMMARY_FORMAT, "settings": settings, "models": models, "ks": ks,
        "ks_note": "two-sample KS test (scipy.stats.ks_2samp) of ||h_T - h_N|| per held-out image between models; "
                   "n_a, n_b images each",
        "paper": PAPER, "wall": wall,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "figures": sorted(p.name for p in figures.glob("*.png")),
        "segmentation_image": f"held-out index {EVAL_INDEX_OFFSET} (the first), in its evaluation batch of "
                              f"{min(config.eval_batch, config.eval_images)}",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, m in models.items():
        log(f"result: {m['label']}: F1 {m['f1_at_N']:.4f} at N={m['N']}, peak {m['f1_peak']:.4f} at t={m['f1_peak_step']}, "
            f"{m['f1_at_T']:.4f} at T={config.test_steps}; median ||h_T - h_N|| {m['distance']['median']:.3g}")
    for k in ks:
        log(f"result: KS {k['a']} vs {k['b']}: D={k['statistic']:.3f}, p={k['pvalue']:.3g} (n={k['n_a']}, {k['n_b']})")
    log(f"wrote {out / 'summary.json'} and {figures}/")
    return summary


HELP = {
    "size": "image side in pixels", "length": "paddles per target contour", "seed": "data and initialisation seed",
    "train_images": "training images (cycled in epochs; the same for every model)", "channels": "hGRU channels C",
    "kernel_size": "horizontal kernel size k", "batch_size": "images per optimizer step",
    "iterations": "optimizer steps of every model (more on a rerun continues the trainers)", "lr": "Adam learning rate",
    "lcp_weight": "weight of the LCP penalty (cbptt, crbp)", "lcp_target": "lambda of the LCP penalty",
    "adjoint_steps": "most adjoint iterations (rbp, crbp)", "adjoint_rule": "relative or published",
    "backend": "hGRU backend of the trainers", "conv": "horizontal conv engine",
    "eval_images": "held-out images of the per-step evaluation", "eval_batch": "images per evaluation batch",
    "test_steps": "T, the steps every model is run for", "pca_images": "images whose states enter the PCA",
    "train_eval_every": "trainer's held-out evaluation every this many steps (0: at the end)",
    "train_eval_images": "held-out images of the trainer's evaluations", "checkpoint_every": "steps between checkpoints",
    "parallel": "trainer processes at a time", "threads": "torch threads per trainer",
    "data_workers": "processes drawing the training images", "device": "auto, cpu or cuda",
    "evaluate_only": "evaluate the checkpoints as they are, without training (e.g. after a time limit)",
    "report_every": "seconds between progress lines",
}


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add ``crbp-fast figure1``."""
    from crbp_fast.cli import DefaultsHelpFormatter

    d = Figure1Config()
    p = subparsers.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0],
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (data/, runs/, figures/, summary.json); rerun to resume")
    p.add_argument("--models", nargs="+", default=list(d.models), help="ALGORITHM:N of each model")
    for f in fields(Figure1Config):
        if f.name in ("out", "models", "progress", "extra_train_args"):
            continue
        if isinstance(f.default, bool):
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=HELP.get(f.name, f.name))
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=HELP.get(f.name, f.name.replace("_", " ")))
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from crbp_fast.cli import CLIError

    values = {f.name: getattr(args, f.name) for f in fields(Figure1Config) if hasattr(args, f.name)}
    values["models"] = tuple(values["models"])
    try:
        run_figure1(Figure1Config(**values))
    except KeyboardInterrupt:
        print("crbp-fast figure1: interrupted; the trainers wrote their checkpoints; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Figure1Error as err:
        raise CLIError(str(err)) from None
    return 0
