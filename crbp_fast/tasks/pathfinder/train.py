"""``crbp-fast train``: train a Pathfinder hGRU with BPTT, C-BPTT, RBP or C-RBP, on one or many processes.

- Data: drawn on the fly by index (a fresh batch every step, or ``--train-size`` images cycled
  in epochs) or read from a ``crbp-fast pathfinder generate`` directory (``--data``). Which
  samples a step uses is a function of the step alone, so a resumed run sees exactly the
  batches an uninterrupted one would.
- Loss: focal loss (gamma 2; by default with the published gradient, p_t constant in the
  modulating factor) on the per-pixel (or per-image) logits, plus ``lcp_weight`` x the LCP penalty
  for cbptt / crbp; Adam. The adjoint of rbp / crbp stops by a relative tolerance by default, or
  by the published code's rules with ``--adjoint-rule published`` (docs/fidelity.md).
- Held-out metrics (IoU, F1, balanced accuracy, accuracy of the positive class, pooled over the
  set) on samples from the disjoint index range starting at ``EVAL_INDEX_OFFSET``.
- Output (``--out``): ``checkpoint.pt`` (model, optimizer, step, RNG states, config, a
  fingerprint of the training data; written atomically), ``log.jsonl`` (one record per logged
  step and per evaluation), ``config.json``. A run holds an exclusive lock on ``OUT/.lock``, so
  a second run into the same folder is refused; temporaries a killed run left are removed on
  start; ``--resume`` refuses data other than the checkpoint's fingerprint, naming both.
- Multi-process: launch with ``torchrun`` (``nccl`` on GPU, ``gloo`` on CPU); each process takes
  ``batch_size`` samples of a global batch (a DistributedSampler-like stride over its indices),
  DDP averages the gradients, and only rank 0 writes.
- Interrupting (Ctrl-C / SIGTERM) finishes the running step, writes a checkpoint and stops;
  ``--resume`` continues from it with the same losses as an uninterrupted run.

Example:
    crbp-fast train --task segmentation --length 14 --algorithm crbp --steps 20 --iterations 20000 \\
        --batch-size 32 --out runs/pf14_crbp
    torchrun --standalone --nproc_per_node 8 -m crbp_fast.cli train ... (same flags)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .dataset import EVAL_INDEX_OFFSET, PathfinderDataset, ShardedPathfinder, ShardError
from .generator import (
    DEFAULT_CONFIG, TASKS, PathfinderConfig, PathfinderError, check_length, check_size, check_task,
)
from ...engine.fixed_point import ADJOINT_RULES, ADJOINT_SOLVERS, ALGORITHMS
from ...hgru.backends import BACKEND_NAMES
from ...hgru.reference import NORM_KINDS
from ..runs import (
    CheckpointError, ConfigError, Dist, Interrupted, RunLog, StepBatches, StopFlag, atomic_torch_save, check_same_data,
    output_folder, process, reduce_step, restore, rng_state,
)
from .losses import FOCAL_VARIANTS, focal_loss
from .metrics import confusion, scores
from .model import CELLS, CONV0_BANKS, READOUT_INITS, PathfinderHGRU
from .published import PublishedCheckpointError, is_published_checkpoint, load_published

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = "crbp_fast.train/1"  # the name stored in checkpoints: unchanged by the move to tasks/

#: Config fields that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = frozenset({
    "iterations", "epochs", "eval_every", "eval_size", "checkpoint_every", "log_every", "out", "resume",
    "device", "workers", "progress", "data", "threads",
})
#: Fields that checkpoints written before they existed lack, with the behaviour those runs had;
#: a missing field means that value, so an old run is neither rebuilt nor resumed differently.
LEGACY_DEFAULTS = {
    "adjoint_rule": "relative", "adjoint_solver": "neumann", "focal_variant": "differentiable",
    "conv0_bank": "zero_mean", "readout_init": "torch", "cell": "hgru",
}
#: Fields that only set the initial weights: on resume the checkpoint's values are kept (its weights are loaded).
INIT_ONLY = frozenset({"conv0_bank", "readout_init"})


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in each checkpoint)."""

    task: str = "segmentation"
    length: int = 14
    size: int = 150
    seed: int = 0
    data: str | None = None
    train_size: int | None = None
    algorithm: str = "crbp"
    steps: int = 20
    adjoint_steps: int = 15
    adjoint_tol: float = 1e-5
    adjoint_solver: str = "neumann"
    adjoint_rule: str = "relative"
    lcp_weight: float = 10.0
    lcp_target: float = 0.9
    lr: float = 1e-3
    batch_size: int = 32
    iterations: int | None = None
    epochs: int | None = None
    focal_gamma: float = 2.0
    focal_variant: str = "published"
    channels: int = 25
    kernel_size: int = 15
    norm: str = "batch"
    backend: str = "auto"
    conv: str = "auto"
    gate_bias_init: str = "published"
    conv0_bank: str = "published"
    readout_init: str = "published"
    cell: str = "hgru"
    eval_size: int = 256
    eval_every: int = 0
    checkpoint_every: int = 500
    log_every: int = 1
    out: str = "runs/pathfinder"
    resume: bool = False
    device: str = "auto"
    workers: int = 0
    threads: int = 0
    progress: bool = True
    generator: dict = field(default_factory=lambda: asdict(DEFAULT_CONFIG))

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first field out of range."""
        try:
            check_task(self.task)
            check_length(self.length)
            check_size(self.size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for name, choices in (("algorithm", ALGORITHMS), ("norm", NORM_KINDS), ("backend", BACKEND_NAMES),
                              ("adjoint_solver", ADJOINT_SOLVERS), ("adjoint_rule", ADJOINT_RULES),
                              ("focal_variant", FOCAL_VARIANTS), ("conv0_bank", CONV0_BANKS),
                              ("readout_init", READOUT_INITS), ("cell", CELLS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}: expected one of {choices}, got {getattr(self, name)!r}")
        if self.adjoint_rule == "published" and self.adjoint_solver != "neumann":
            raise ConfigError(
                f"adjoint_rule: 'published' applies to adjoint_solver 'neumann', got adjoint_solver={self.adjoint_solver!r}")
        for name, low in (("steps", 1), ("adjoint_steps", 0), ("batch_size", 1), ("channels", 1), ("kernel_size", 1),
                          ("eval_size", 0), ("eval_every", 0), ("checkpoint_every", 0), ("log_every", 1),
                          ("workers", 0), ("threads", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected an int >= {low}, got {value!r}")
        if (self.iterations is None) == (self.epochs is None):
            raise ConfigError(
                f"iterations / epochs: give exactly one, got iterations={self.iterations!r}, epochs={self.epochs!r}"
            )
        for name in ("iterations", "epochs", "train_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}: expected an int >= 1, got {value!r}")
        if self.data is not None and self.train_size is not None:
            raise ConfigError(
                f"train_size: {self.train_size} was given with data={self.data!r}; the data directory fixes the "
                f"training set, so give one of them"
            )
        if self.epochs is not None and self.data is None and self.train_size is None:
            raise ConfigError("epochs: needs a finite training set: pass data (a generated directory) or train_size")
        for name in ("adjoint_tol", "lcp_weight", "lcp_target", "lr", "focal_gamma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr: expected a number > 0, got {self.lr!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")


@dataclass
class TrainResult:
    """What :func:`train` did: the last step, the final held-out metrics, and where it wrote."""

    step: int
    metrics: dict[str, float]
    out: Path
    losses: list[float]


# --- distributed --------------------------------------------------------------------------------


# --- data ---------------------------------------------------------------------------------------


def _resolve_data(config: TrainConfig, world: int) -> tuple[Dataset, int | None, int]:
    """Training set, its finite size (None when unbounded), and the number of iterations."""
    global_batch = config.batch_size * world
    if config.data is not None:
        ds = ShardedPathfinder(config.data)
        for name in ("task", "length", "size", "seed"):
            if getattr(config, name) != getattr(ds, name):
                raise ConfigError(
                    f"{name}: {getattr(config, name)!r} was asked for but the data in {config.data} has "
                    f"{name} {getattr(ds, name)!r}"
                )
        config.generator = asdict(ds.config)
        n: int | None = ds.n
    else:
        n = config.train_size
    if n is not None and n < global_batch:
        raise ConfigError(
            f"batch_size: a global batch of {global_batch} ({config.batch_size} x {world} processes) is larger "
            f"than the training set of {n} images"
        )
    if config.epochs is not None:
        iterations = config.epochs * (n // global_batch)  # type: ignore[operator]
    else:
        iterations = config.iterations  # type: ignore[assignment]
    if n is None and iterations * global_batch > EVAL_INDEX_OFFSET:
        raise ConfigError(f"iterations: {iterations} x {global_batch} images would reach the held-out index range")
    if config.data is not None:
        return ds, n, iterations
    gen = PathfinderConfig(**config.generator)
    size = n if n is not None else iterations * global_batch
    return PathfinderDataset(config.task, config.length, config.size, config.seed, size, config=gen), n, iterations


# --- checkpoints and logs -----------------------------------------------------------------------


def data_fingerprint(config: TrainConfig, dataset: Dataset) -> dict:
    """What the training data is, recorded in each checkpoint and compared on resume."""
    if isinstance(dataset, ShardedPathfinder):
        return dataset.fingerprint()
    return {"source": "on the fly", "task": config.task, "length": config.length, "size": config.size,
            "seed": config.seed, "n": config.train_size, "generator": config.generator}


def _describe_data(fp: dict) -> str:
    where = f"{fp.get('task')}, length {fp.get('length')}, {fp.get('size')}x{fp.get('size')}, seed {fp.get('seed')}"
    if fp.get("source") == "shards":
        return f"shards of {fp.get('n')} images ({where}, content {str(fp.get('content_sha256'))[:12]})"
    cycle = "a fresh batch every step" if fp.get("n") is None else f"{fp.get('n')} images cycled in epochs"
    return f"images drawn on the fly ({where}, {cycle})"


def read_checkpoint(path: str | os.PathLike, *, published: bool = False) -> dict:
    """Load a training checkpoint (on CPU) and check its format; raises :class:`CheckpointError`.

    With ``published=True`` a checkpoint of the published Pathfinder training script (its
    ``{"epoch", "state_dict", "best_prec1"}``, DataParallel's ``module.`` prefix or not) is
    accepted too, and returned as ``{"format": models.PUBLISHED_FORMAT, "model": <state dict under
    PathfinderHGRU's names>, "config": None, "epoch", "best_prec1"}`` (see
    :mod:`crbp_fast.tasks.pathfinder.published`). Without it such a file is refused with a message that
    says so (it has no optimizer state or config to resume from).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None
    if isinstance(ckpt, dict) and "format" not in ckpt and is_published_checkpoint(ckpt):
        if not published:
            raise CheckpointError(
                f"checkpoint {path} is a checkpoint of the published Pathfinder code (no config, no optimizer "
                f"state): load it with PathfinderHGRU.from_published, or diagnose it with --train-steps and --length")
        return _published_checkpoint(ckpt, path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path}: format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    return ckpt


def _published_checkpoint(ckpt: dict, path: Path) -> dict:
    try:
        out = load_published(ckpt)
    except PublishedCheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    return {**out, "config": None}


def load_model_state(model: torch.nn.Module, state: dict, source: str, saved_config: dict | None = None) -> None:
    """``model.load_state_dict(state)`` with errors that name the parameter and both shapes.

    ``saved_config`` (the checkpoint's config) adds the model fields it was trained with to the message.
    """
    hint = ""
    if saved_config is not None:
        fields = ", ".join(f"{k}={saved_config.get(k)!r}" for k in ("task", "channels", "kernel_size", "norm"))
        hint = f" (the checkpoint was trained with {fields})"
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: parameters do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}{hint}"
        )
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{source}: parameter {name!r} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(own[name].shape)} in the model{hint}"
            )
    model.load_state_dict(state)


def build_model(config: TrainConfig | dict) -> PathfinderHGRU:
    """The :class:`PathfinderHGRU` a config (or a checkpoint's config dict) describes."""
    c = {**LEGACY_DEFAULTS, **(config if isinstance(config, dict) else asdict(config))}
    return PathfinderHGRU(
        c["task"], c["channels"], c["kernel_size"], steps=c["steps"], algorithm=c["algorithm"], norm=c["norm"],
        backend=c["backend"], conv=c["conv"], gate_bias_init=c["gate_bias_init"], adjoint_steps=c["adjoint_steps"],
        adjoint_tol=c["adjoint_tol"], adjoint_solver=c["adjoint_solver"], adjoint_rule=c["adjoint_rule"],
        lcp_target=c["lcp_target"], conv0_bank=c["conv0_bank"], readout_init=c["readout_init"], cell=c["cell"],
    )


def _check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    saved = {**LEGACY_DEFAULTS, **saved}
    for name in INIT_ONLY:
        setattr(config, name, saved[name])  # how the resumed run was initialised, whatever is asked now
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE_CHANGES or f.name not in saved:
            continue
        if saved[f.name] != getattr(config, f.name):
            raise CheckpointError(
                f"{path}: --{f.name.replace('_', '-')} is {getattr(config, f.name)!r} but the checkpoint was "
                f"trained with {saved[f.name]!r}; resume with the same value or choose another --out"
            )


# --- the loop -----------------------------------------------------------------------------------


def _loss(model_out, target: torch.Tensor, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    task_loss = focal_loss(model_out.logits, target, config.focal_gamma, config.focal_variant)
    if model_out.penalty is None:
        return task_loss, task_loss
    return task_loss + config.lcp_weight * model_out.penalty, task_loss


@torch.no_grad()
def evaluate(model: PathfinderHGRU, dataset: Dataset, batch_size: int, device: torch.device, rank: int = 0,
             world: int = 1, gamma: float = 2.0) -> dict[str, float]:
    """Pooled held-out metrics (and the mean focal loss) of ``model`` over ``dataset``.

    Each rank takes every world-th sample; the counts are summed over ranks.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_seen = torch.zeros((), dtype=torch.float64, device=device)
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(dataset, batch_sampler=[indices[i:i + batch_size] for i in range(0, len(indices), batch_size)])
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        logits = model(images).logits
        counts += confusion(logits.argmax(1), target)
        loss_sum += focal_loss(logits, target, gamma).double() * len(images)
        n_seen += len(images)
    if world > 1:
        dist.all_reduce(counts)
        dist.all_reduce(loss_sum)
        dist.all_reduce(n_seen)
    model.train(was_training)
    out = scores(counts.cpu())
    out["loss"] = float(loss_sum / n_seen.clamp_min(1))
    return out


def train(
    config: TrainConfig, *, after_backward: Callable[[int, torch.nn.Module], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run (or resume) the training that ``config`` describes; see the module docstring.

    Args:
        config: the run; ``config.check()`` is called first.
        after_backward: called as ``after_backward(step, model)`` on every rank after the
            gradients of step ``step`` (1-based) are reduced, before the optimizer step.
        after_step: called as ``after_step(step)`` after step ``step`` finished.

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: a config field out of range (its message names it).
        CheckpointError: an existing checkpoint without ``resume``, or one that does not fit.
        ShardError: a missing or corrupt shard of ``config.data``.
        Interrupted: SIGINT / SIGTERM arrived; the finished steps are checkpointed.
    """
    config.check()
    with process(config.device, config.threads) as env:
        return _train(config, env, after_backward, after_step)


def _train(config: TrainConfig, env: Dist, after_backward, after_step) -> TrainResult:
    dataset, n_finite, iterations = _resolve_data(config, env.world)
    if isinstance(dataset, ShardedPathfinder):
        dataset.verify()
    out = Path(config.out)
    fingerprint = data_fingerprint(config, dataset)
    with output_folder(out, (CHECKPOINT_FILE, LOG_FILE, CONFIG_FILE), env.is_main):
        return _train_locked(config, env, after_backward, after_step, dataset, n_finite, iterations, fingerprint)


def _train_locked(config: TrainConfig, env: Dist, after_backward, after_step, dataset, n_finite, iterations,
                  fingerprint) -> TrainResult:
    out = Path(config.out)
    ckpt_path = out / CHECKPOINT_FILE

    torch.manual_seed(config.seed)
    try:
        model = build_model(config).to(env.device)
        # Resolve the backend and conv engine for this device now, so that a backend that cannot
        # run here (triton without a GPU) is a config error before anything is written.
        from ...hgru.backends import resolve_backend

        resolve_backend(config.backend, env.device)
    except (ValueError, TypeError, RuntimeError) as err:  # the cell's messages name the argument
        raise ConfigError(str(err)) from None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    def check(ckpt: dict) -> None:
        load_model_state(model, ckpt["model"], str(ckpt_path), ckpt["config"])
        _check_resumable(ckpt["config"], config, ckpt_path)
        check_same_data(ckpt.get("data"), fingerprint, ckpt_path, _describe_data)

    _, start, elapsed = restore(ckpt_path, config.resume, read_checkpoint, check, optimizer)
    log = RunLog(out, LOG_FILE, CONFIG_FILE, asdict(config), start, env.is_main)

    net: torch.nn.Module = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None)
    gen = PathfinderConfig(**config.generator)
    eval_set = PathfinderDataset(config.task, config.length, config.size, config.seed, config.eval_size,
                                 start=EVAL_INDEX_OFFSET, config=gen)
    sampler = StepBatches(start, iterations, config.batch_size, env.rank, env.world, n_finite, config.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.workers,
                        pin_memory=env.device.type == "cuda")
    from tqdm.auto import tqdm

    bar = tqdm(total=iterations, initial=start, unit="it", desc=f"{config.algorithm} N={config.steps}",
               disable=not (env.is_main and config.progress), dynamic_ncols=True)
    write = log.write

    def save(step: int) -> Path | None:
        if not env.is_main:
            return None
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "step": step, "elapsed": elapsed, "config": asdict(config), "data": fingerprint,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
        }, ckpt_path)
        return ckpt_path

    def run_eval(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = evaluate(model, eval_set, config.batch_size, env.device, env.rank, env.world, config.focal_gamma)
        write({"kind": "eval", "step": step, **metrics, "seconds": time.perf_counter() - t0})
        return metrics

    losses: list[float] = []
    step = saved_step = start
    metrics: dict[str, float] = {}
    model.train()
    try:
        with StopFlag() as stop:
            for images, target in loader:
                t0 = time.perf_counter()
                images = images.to(env.device, non_blocking=True)
                target = target.to(env.device, non_blocking=True)
                output = net(images)
                loss, task_loss = _loss(output, target, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if after_backward is not None:
                    after_backward(step + 1, model)
                optimizer.step()
                step += 1
                if after_step is not None:
                    after_step(step)
                penalty = output.penalty.detach() if output.penalty is not None else torch.zeros((), device=env.device)
                reduced, stop_any = reduce_step([loss.detach(), task_loss.detach(), penalty], stop.requested, env)
                seconds = time.perf_counter() - t0
                elapsed += seconds
                loss_value = float(reduced[0])
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"the loss became {loss_value} at step {step}; lower --lr, or use --algorithm crbp / cbptt "
                        f"(the LCP keeps the recurrence contractive)"
                    )
                losses.append(loss_value)
                stats = output.stats
                if step % config.log_every == 0 or step == iterations:
                    write({
                        "kind": "train", "step": step, "loss": loss_value, "task_loss": float(reduced[1]),
                        "penalty": float(reduced[2]) if output.penalty is not None else None,
                        "adjoint_iterations": stats.adjoint_iterations, "adjoint_residual": stats.adjoint_residual,
                        "adjoint_stop": stats.adjoint_stop, "forward_residual": stats.max_forward_residual,
                        "seconds": seconds, "elapsed": elapsed, "lr": optimizer.param_groups[0]["lr"],
                    })
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                bar.update(1)
                if config.eval_every and step % config.eval_every == 0 and step < iterations:
                    run_eval(step)
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save(step)
                    saved_step = step
                if stop_any:
                    raise Interrupted(step, save(step))
        bar.close()
        if step > start and config.eval_size:
            metrics = run_eval(step)
        if step != saved_step or not ckpt_path.exists():
            save(step)
    finally:
        bar.close()
        log.close()
    return TrainResult(step, metrics, out, losses)


# --- command line -------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add ``crbp-fast train``."""
    from ...cli import DefaultsHelpFormatter

    d = TrainConfig()
    p = subparsers.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0],
                              formatter_class=DefaultsHelpFormatter)
    g = p.add_argument_group("data")
    from_data = "; with --data: the directory's"
    g.add_argument("--task", help=f"one of {TASKS} (default: {d.task}{from_data})")
    g.add_argument("--length", type=int, help=f"paddles per target contour, 2..40 (default: {d.length}{from_data})")
    g.add_argument("--size", type=int, help=f"image side (default: {d.size}{from_data})")
    g.add_argument("--seed", type=int, help=f"dataset and initialisation seed (default: {d.seed}{from_data})")
    g.add_argument("--data", default=None, help="a `crbp-fast pathfinder generate` directory (default: on the fly)")
    g.add_argument("--train-size", type=int, default=None,
                   help="on the fly: cycle this many images in epochs (default: a fresh batch every step)")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algorithm", default=d.algorithm, help=f"one of {ALGORITHMS}")
    g.add_argument("--steps", type=int, default=d.steps, help="recurrent steps N")
    g.add_argument("--adjoint-steps", type=int, default=d.adjoint_steps, help="most adjoint iterations (rbp, crbp)")
    g.add_argument("--adjoint-tol", type=float, default=d.adjoint_tol,
                   help="relative adjoint tolerance of --adjoint-rule relative (0: all steps)")
    g.add_argument("--adjoint-rule", default=d.adjoint_rule,
                   help=f"one of {ADJOINT_RULES}: 'published' stops as the published code does (||g|| > 1, ||v|| "
                        f"grows, ||v|| < 1e-9; use it with --adjoint-steps 15); 'relative' by --adjoint-tol")
    g.add_argument("--adjoint-solver", default=d.adjoint_solver, help=f"one of {ADJOINT_SOLVERS}")
    g.add_argument("--lcp-weight", type=float, default=d.lcp_weight, help="weight of the LCP penalty (cbptt, crbp)")
    g.add_argument("--lcp-target", type=float, default=d.lcp_target, help="lambda of the LCP penalty")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per process and step")
    length = g.add_mutually_exclusive_group(required=True)
    length.add_argument("--iterations", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=int, help="passes over a finite training set (--data or --train-size)")
    g.add_argument("--focal-gamma", type=float, default=d.focal_gamma, help="focal loss exponent")
    g.add_argument("--focal-variant", default=d.focal_variant,
                   help=f"one of {FOCAL_VARIANTS}: 'published' holds p_t constant in (1 - p_t)^gamma")
    g = p.add_argument_group("model")
    g.add_argument("--channels", type=int, default=d.channels, help="channels C")
    g.add_argument("--kernel-size", type=int, default=d.kernel_size, help="horizontal kernel size k")
    g.add_argument("--norm", default=d.norm, help=f"one of {NORM_KINDS}")
    g.add_argument("--backend", default=d.backend, help=f"one of {BACKEND_NAMES}")
    g.add_argument("--conv", default=d.conv, help="horizontal conv engine: auto, direct, fft")
    g.add_argument("--gate-bias-init", default=d.gate_bias_init, help="published or chronos")
    g.add_argument("--conv0-bank", default=d.conv0_bank,
                   help=f"one of {CONV0_BANKS}: conv0's initial bank (kept from the checkpoint on --resume)")
    g.add_argument("--readout-init", default=d.readout_init,
                   help=f"one of {READOUT_INITS} (kept from the checkpoint on --resume)")
    g.add_argument("--cell", default=d.cell,
                   help=f"one of {CELLS}: the recurrent cell (convgru / convlstm: crbp_fast.cells, k x k kernels)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="output directory (checkpoint.pt, log.jsonl, config.json)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    g.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out images (0: no evaluation)")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="evaluate every this many steps (0: at the end only)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between log records")
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    g.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=_run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``crbp-fast train`` arguments.

    Dataset fields left out (None) come from ``--data``'s index when given, else the defaults.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"generator"}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.data is not None:
        ds = ShardedPathfinder(args.data)
        for name in ("task", "length", "size", "seed"):
            given.setdefault(name, getattr(ds, name))
    return TrainConfig(**given)


def _run(args: argparse.Namespace) -> int:
    from ...cli import CLIError

    try:
        result = train(config_from_args(args))
    except Interrupted as stop:
        print(f"crbp-fast train: interrupted after step {stop.step}; checkpoint {stop.checkpoint}; "
              f"continue with the same command and --resume", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, ShardError, PathfinderError) as err:
        raise CLIError(str(err)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        if not result.losses:
            print(f"step {result.step}: the run had already reached its last step; nothing to do")
        else:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()) or "no evaluation"
            print(f"step {result.step}: loss {result.losses[-1]:.4f}; held-out {shown}; wrote {result.out}")
    return 0
