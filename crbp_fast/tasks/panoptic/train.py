"""``crbp-fast panoptic train`` / ``eval``: the recurrent Panoptic FPN, with the Pathfinder trainer's habits.

- Data: a COCO-panoptic root (:mod:`crbp_fast.tasks.panoptic.data`; ``crbp-fast panoptic generate``
  writes the synthetic one); a step's batch is a function of the step alone (the Pathfinder
  trainer's per-epoch permutation), so a resumed run sees exactly the batches an uninterrupted
  one would.
- Loss: the Mask R-CNN losses + the semantic loss + ``lcp_weight`` x the FPN's summed LCP
  penalty (cbptt / crbp); Adam.
- Held-out PQ / SQ / RQ (torchmetrics) on ``eval_split``: of the untrained model at step 0 of a
  fresh run, every ``eval_every`` steps, and at the end.
- Output (``--out``): ``checkpoint.pt`` (atomic), ``log.jsonl``, ``config.json``, as
  :mod:`crbp_fast.tasks.pathfinder.train` writes them (its helpers are used here).
- Multi-process: ``torchrun`` (gloo on CPU, nccl on GPU); rank 0 writes.
- Ctrl-C / SIGTERM finish the step, checkpoint and stop; ``--resume`` continues exactly.

Example:
    crbp-fast panoptic generate --out data/synthetic_panoptic
    crbp-fast panoptic train --data data/synthetic_panoptic --algorithm crbp --steps 5 --iterations 300 \\
        --out runs/panoptic_crbp
    crbp-fast panoptic eval --checkpoint runs/panoptic_crbp/checkpoint.pt --data data/synthetic_panoptic --steps 20
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..pathfinder.train import load_model_state
from ..runs import (
    CheckpointError, ConfigError, Interrupted, RunLog, StepBatches, StopFlag, atomic_torch_save, check_same_data,
    output_folder, process, reduce_step, restore, rng_state, set_rng_state,
)
from .config import RESUMABLE_CHANGES, PanopticTrainConfig
from .data import CocoPanoptic, collate
from .metrics import PanopticScore
from .model import PanopticFPN

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = "crbp_fast.panoptic.train/1"  # the name stored in checkpoints: unchanged by the move to tasks/
@dataclass
class PanopticTrainResult:
    step: int
    metrics: dict[str, float]
    untrained: dict[str, float]
    out: Path
    losses: list[float]


def build_model(config: PanopticTrainConfig, things: list[int], stuffs: list[int]) -> PanopticFPN:
    """The model of a run (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    try:
        return PanopticFPN(config.model_config(len(things), len(stuffs)), things, stuffs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a panoptic checkpoint on CPU and check its format; raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path}: format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    return ckpt


def _check_resumable(saved: dict, config: PanopticTrainConfig, path: Path) -> None:
    for f in fields(PanopticTrainConfig):
        if f.name in RESUMABLE_CHANGES or f.name not in saved:
            continue
        if saved[f.name] != getattr(config, f.name):
            raise CheckpointError(
                f"{path}: --{f.name.replace('_', '-')} is {getattr(config, f.name)!r} but the checkpoint was "
                f"trained with {saved[f.name]!r}; resume with the same value or choose another --out")


def _datasets(config: PanopticTrainConfig) -> tuple[CocoPanoptic, CocoPanoptic | None]:
    train_set = CocoPanoptic(config.data, config.split, limit=config.train_limit or None)
    eval_set = None
    if config.eval_limit != 0:
        eval_set = CocoPanoptic(config.data, config.eval_split, limit=config.eval_limit)
        if (eval_set.things, eval_set.stuffs) != (train_set.things, train_set.stuffs):
            raise ConfigError(f"eval_split: {config.eval_split!r} has other categories than split {config.split!r}")
    return train_set, eval_set


@torch.no_grad()
def evaluate(model: PanopticFPN, dataset: CocoPanoptic, batch_size: int, device: torch.device, rank: int = 0,
             world: int = 1) -> dict[str, float]:
    """PQ / SQ / RQ (0..100) of ``model`` on ``dataset``; each rank takes every world-th image."""
    was_training = model.training
    model.eval()
    score = PanopticScore(dataset.things, dataset.stuffs)
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(dataset, batch_sampler=[indices[i:i + batch_size] for i in range(0, len(indices), batch_size)],
                        collate_fn=collate)
    residual = 0.0
    for images, targets in loader:
        out = model([im.to(device) for im in images])
        residual = max(residual, getattr(model.fpn, "max_forward_residual", 0.0))
        for result, target in zip(out.results, targets):
            score.update(result["panoptic"], target["panoptic"])
    model.train(was_training)
    # torchmetrics gathers the states of every rank in compute() when a process group is up.
    metrics = score.compute()
    metrics["forward_residual"] = residual
    return metrics


def train(config: PanopticTrainConfig, *,
          after_backward: Callable[[int, torch.nn.Module], None] | None = None,
          after_step: Callable[[int], None] | None = None) -> PanopticTrainResult:
    """Run (or resume) the training that ``config`` describes (module docstring).

    ``after_backward(step, model)`` is called on every rank after the gradients of step ``step``
    (1-based) are reduced, before the optimizer step; ``after_step(step)`` after the step.
    """
    config.check()
    with process(config.device, config.threads) as env:
        return _train(config, env, after_backward, after_step)


def _describe_data(fp: dict) -> str:
    return (f"split {fp.get('split')!r} of {fp.get('n')} images (annotations "
            f"{str(fp.get('annotations_sha256'))[:12]})")


def _train(config: PanopticTrainConfig, env, after_backward, after_step) -> PanopticTrainResult:
    # One run per output folder (rank 0 holds OUT/.lock for the whole run), as the Pathfinder trainer.
    with output_folder(Path(config.out), (CHECKPOINT_FILE, LOG_FILE, CONFIG_FILE), env.is_main):
        return _train_locked(config, env, after_backward, after_step)


def _train_locked(config: PanopticTrainConfig, env, after_backward, after_step) -> PanopticTrainResult:
    train_set, eval_set = _datasets(config)
    global_batch = config.batch_size * env.world
    if len(train_set) < global_batch:
        raise ConfigError(f"batch_size: a global batch of {global_batch} ({config.batch_size} x {env.world} "
                          f"processes) is larger than the training set of {len(train_set)} images")
    out = Path(config.out)
    ckpt_path = out / CHECKPOINT_FILE
    model = build_model(config, train_set.things, train_set.stuffs).to(env.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    def check(ckpt: dict) -> None:
        _check_resumable(ckpt["config"], config, ckpt_path)
        check_same_data(ckpt.get("data"), train_set.fingerprint(), ckpt_path, _describe_data)
        load_model_state(model, ckpt["model"], str(ckpt_path))

    _, start, elapsed = restore(ckpt_path, config.resume, read_checkpoint, check, optimizer)
    log = RunLog(out, LOG_FILE, CONFIG_FILE, asdict(config), start, env.is_main)

    net: torch.nn.Module = model
    if env.world > 1:
        # The mask head gets no gradient on a batch without positive proposals.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None, find_unused_parameters=True)
    sampler = StepBatches(start, config.iterations, config.batch_size, env.rank, env.world, len(train_set),
                           config.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=config.workers, collate_fn=collate)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.iterations, initial=start, unit="it", desc=f"panoptic {config.algorithm} N={config.steps}",
               disable=not (env.is_main and config.progress), dynamic_ncols=True)
    write = log.write

    def save(step: int) -> Path | None:
        if not env.is_main:
            return None
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "step": step, "elapsed": elapsed, "config": asdict(config),
            "things": train_set.things, "stuffs": train_set.stuffs, "data": train_set.fingerprint(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
        }, ckpt_path)
        return ckpt_path

    def run_eval(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = evaluate(model, eval_set, config.batch_size, env.device, env.rank, env.world)
        write({"kind": "eval", "step": step, **metrics, "seconds": time.perf_counter() - t0})
        return metrics

    losses: list[float] = []
    untrained: dict[str, float] = {}
    step = saved_step = start
    metrics: dict[str, float] = {}
    try:
        if start == 0 and eval_set is not None and config.eval_untrained:
            # The untrained model's PQ, with the RNG state restored so that the run is the same
            # with or without this evaluation.
            state = rng_state()
            untrained = run_eval(0)
            set_rng_state(state)
        model.train()
        # Starting a DataLoader iterator draws a seed from the global RNG; the RPN and ROI
        # samplers draw from it too, so keep the draw out of the stream for an exact resume.
        state = rng_state()
        batches = iter(loader)
        set_rng_state(state)
        with StopFlag() as stop:
            for images, targets in batches:
                t0 = time.perf_counter()
                images = [im.to(env.device) for im in images]
                targets = [{k: (v.to(env.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
                output = net(images, targets)
                task_loss = sum(output.losses.values())
                penalty = output.penalty
                loss = task_loss + config.lcp_weight * penalty if penalty is not None else task_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if after_backward is not None:
                    after_backward(step + 1, model)
                optimizer.step()
                step += 1
                if after_step is not None:
                    after_step(step)
                terms = [loss.detach(), task_loss.detach(),
                         penalty.detach() if penalty is not None else torch.zeros((), device=env.device),
                         *(v.detach() for v in output.losses.values())]
                reduced, stop_any = reduce_step(terms, stop.requested, env)
                seconds = time.perf_counter() - t0
                elapsed += seconds
                loss_value = float(reduced[0])
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"the loss became {loss_value} at step {step}; lower --lr, or use --algorithm crbp / cbptt "
                        f"(the LCP keeps the recurrence contractive)")
                losses.append(loss_value)
                if step % config.log_every == 0 or step == config.iterations:
                    stats = getattr(model.fpn, "level_stats", [])
                    adjoint = [s.adjoint_iterations for s in stats if s.adjoint_iterations is not None]
                    write({
                        "kind": "train", "step": step, "loss": loss_value, "task_loss": float(reduced[1]),
                        "penalty": float(reduced[2]) if penalty is not None else None,
                        **{k: float(v) for k, v in zip(output.losses, reduced[3:])},
                        "forward_residual": max((s.max_forward_residual for s in stats), default=None),
                        "adjoint_iterations": max(adjoint, default=None),
                        "seconds": seconds, "elapsed": elapsed, "lr": optimizer.param_groups[0]["lr"],
                    })
                bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
                bar.update(1)
                if config.eval_every and eval_set is not None and step % config.eval_every == 0 \
                        and step < config.iterations:
                    run_eval(step)
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save(step)
                    saved_step = step
                if stop_any:
                    raise Interrupted(step, save(step))
        bar.close()
        if step > start and eval_set is not None:
            metrics = run_eval(step)
        if step != saved_step or not ckpt_path.exists():
            save(step)
    finally:
        bar.close()
        log.close()
    return PanopticTrainResult(step, metrics, untrained, out, losses)


def evaluate_checkpoint(path: str | os.PathLike, data: str | None = None, split: str | None = None,
                        limit: int | None = None, steps: int | None = None, batch_size: int = 4,
                        device: str = "cpu") -> dict[str, float]:
    """PQ of a trained checkpoint on a split, optionally run for another number of steps ``steps``."""
    ckpt = read_checkpoint(path)
    config = PanopticTrainConfig(**ckpt["config"])
    if steps is not None:
        config.steps = steps
        config.check()
    dataset = CocoPanoptic(data or config.data, split or config.eval_split, limit=limit)
    if (dataset.things, dataset.stuffs) != (ckpt["things"], ckpt["stuffs"]):
        raise ConfigError(f"data: the categories of {dataset.paths.annotations} differ from the checkpoint's")
    model = build_model(config, dataset.things, dataset.stuffs)
    load_model_state(model, ckpt["model"], str(path))
    dev = torch.device(device)
    return evaluate(model.to(dev), dataset, batch_size, dev)


__all__ = ["CHECKPOINT_FORMAT", "PanopticTrainConfig", "PanopticTrainResult", "build_model", "evaluate",
           "evaluate_checkpoint", "read_checkpoint", "train"]
