"""``crbp-fast panoptic {generate,train,eval,memory}``: the recurrent Panoptic FPN task.

    crbp-fast panoptic generate --out data/synthetic_panoptic      # 200 train + 50 val images, 64 x 64
    crbp-fast panoptic train --data data/synthetic_panoptic --algorithm crbp --steps 5 --iterations 300
    crbp-fast panoptic eval --checkpoint runs/panoptic/checkpoint.pt --steps 20
    crbp-fast panoptic memory --preset cpu      # = crbp-fast bench panoptic: BPTT 1-5 vs C-RBP 5-20

These need torchvision, torchmetrics and pycocotools (``bash scripts/setup_vision_env.sh``); this
module imports them only when a subcommand runs, so ``crbp-fast --help`` works without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


def _need_vision(modules: tuple[str, ...] = ("torchvision", "torchmetrics", "pycocotools"),
                 what: str = "the panoptic task") -> None:
    import importlib

    from ...cli import CLIError

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or torchvision's RuntimeError beside a CPU-only torch
            raise CLIError(
                f"{what} needs {', '.join(modules)}; {name} does not import here ({type(err).__name__}: "
                f"{err}); run `bash scripts/setup_vision_env.sh` and use the python it prints"
            ) from None


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add ``crbp-fast panoptic ...``."""
    p = subparsers.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="panoptic_command", required=True, metavar="{generate,train,eval,memory}")

    g = sub.add_parser("generate", help="write the synthetic COCO-panoptic dataset")
    g.add_argument("--out", default="data/synthetic_panoptic", help="dataset root")
    g.add_argument("--train", type=int, default=200, help="training images")
    g.add_argument("--val", type=int, default=50, help="validation images")
    g.add_argument("--size", type=int, default=64, help="image side")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_generate)

    t = sub.add_parser("train", help="train a Panoptic FPN with a recurrent FPN (DDP via torchrun)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_train_options(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="PQ / SQ / RQ of a checkpoint (optionally at another number of steps)")
    e.add_argument("--checkpoint", required=True, help="a `crbp-fast panoptic train` checkpoint.pt")
    e.add_argument("--data", default=None, help="dataset root (default: the run's)")
    e.add_argument("--split", default=None, help="split (default: the run's eval split)")
    e.add_argument("--limit", type=int, default=None, help="first this many images")
    e.add_argument("--steps", type=int, default=None, help="recurrent steps at test time (default: the run's)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    e.set_defaults(func=_eval)

    m = sub.add_parser("memory", help="the same as `crbp-fast bench panoptic`: memory of one iteration, BPTT vs "
                                      "C-RBP")
    add_memory_options(m)


def add_memory_options(p: argparse.ArgumentParser) -> None:
    """The options of the panoptic memory sweep (``crbp-fast bench panoptic``, ``crbp-fast panoptic memory``)."""
    from .config import BACKBONES, MEMORY_PRESETS

    presets = "; ".join(f"{k}: {v.batch} x {v.height}x{v.width}, {v.backbone}, FPN width {v.fpn_width}"
                        for k, v in MEMORY_PRESETS.items())
    add = p.add_argument
    add("--preset", default=None, help=f"{presets} (default: coco on CUDA, cpu otherwise)")
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    add("--threads", type=int, default=None, metavar="T", help="torch.set_num_threads")
    add("--bptt-steps", type=int, nargs="*", default=None, metavar="N", help="BPTT's N (default: 1 2 3 4 5)")
    add("--crbp-steps", type=int, nargs="*", default=None, metavar="N", help="C-RBP's N (default: 5 10 20)")
    add("--batch", type=int, default=None, metavar="B", help="images per iteration (default: the preset's)")
    add("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size (default: the preset's)")
    add("--backbone", default=None, help=f"any of {' '.join(BACKBONES)} (default: the preset's)")
    add("--fpn-width", type=int, default=None, metavar="C", help="FPN width (default: the preset's)")
    add("--cell-backend", default="auto", help="hGRU backend of the recurrent laterals: auto, torch, triton, native")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=None, metavar="DIR",
        help="append the rows to DIR/<device-slug>.jsonl (benchmarks/results/panoptic is where the committed "
             "rows live; default: print the table only)")
    p.set_defaults(func=run_memory)


def run_memory(args: argparse.Namespace) -> int:
    """``crbp-fast bench panoptic`` / ``crbp-fast panoptic memory``: the sweep, its table, and the rows on request."""
    _need_vision(("torchvision",), "the panoptic memory preset")
    import torch

    from ...bench.cli import records_file
    from ...bench.records import append_records
    from ...bench.setups import resolve_device
    from ...cli import CLIError
    from ...hgru.backends import BACKEND_NAMES
    from . import memory
    from .config import BACKBONES

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise CLIError(f"--{err}") from None
    name = args.preset or ("coco" if device.type == "cuda" else "cpu")
    if name not in memory.PRESETS:
        raise CLIError(f"--preset: expected one of {', '.join(memory.PRESETS)}, got {name!r}")
    preset = memory.PRESETS[name]
    for option, values in (("--bptt-steps", args.bptt_steps), ("--crbp-steps", args.crbp_steps)):
        bad = [v for v in values or [] if v < 1]
        if bad:
            raise CLIError(f"{option}: expected N >= 1, got {bad[0]}")
    for option, value in (("--batch", args.batch), ("--fpn-width", args.fpn_width), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise CLIError(f"{option}: expected a number >= 1, got {value}")
    if args.size is not None and min(args.size) < 32:
        raise CLIError(f"--size: expected H and W >= 32 (the backbone's stride), got {args.size[0]} {args.size[1]}")
    if args.backbone is not None and args.backbone not in BACKBONES:
        raise CLIError(f"--backbone: expected one of {', '.join(BACKBONES)}, got {args.backbone!r}")
    if args.cell_backend != "auto" and args.cell_backend not in BACKEND_NAMES:
        raise CLIError(f"--cell-backend: expected one of {', '.join(BACKEND_NAMES)}, got {args.cell_backend!r}")
    changes = {k: v for k, v in (("batch", args.batch), ("backbone", args.backbone), ("fpn_width", args.fpn_width))
               if v is not None}
    if args.size is not None:
        changes.update(height=args.size[0], width=args.size[1])
    preset = dataclasses.replace(preset, **changes)
    algorithms = {"bptt": tuple(args.bptt_steps) if args.bptt_steps is not None else preset.bptt_steps,
                  "crbp": tuple(args.crbp_steps) if args.crbp_steps is not None else preset.crbp_steps}
    algorithms = {a: tuple(sorted(set(ns))) for a, ns in algorithms.items() if ns}
    if not algorithms:
        raise CLIError("--bptt-steps / --crbp-steps: both are empty; nothing to measure")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    label = name if not changes else f"{name}-custom"
    path = None
    if args.out is not None:
        from ...bench.records import device_name

        path = records_file(args.out, device_name(device))
    print(f"crbp-fast bench panoptic: preset {label} ({preset.batch} x {preset.height}x{preset.width}, "
          f"{preset.backbone}, FPN width {preset.fpn_width}) on {device}, {torch.get_num_threads()} thread(s)")
    emit = (lambda rows: append_records(path, rows)) if path is not None else None
    try:
        rows = memory.run(preset, device, algorithms, seed=args.seed, cell_backend=args.cell_backend, name=label,
                          emit=emit)
    except (ValueError, RuntimeError) as err:  # a backend that cannot run here, an impossible model
        raise CLIError(f"--cell-backend / the preset: {err}") from None
    print(memory.table(rows))
    print(f"\nwrote {len(rows)} rows to {path}" if path is not None else "\n(not written: pass --out DIR to keep the rows)")
    return 0


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from dataclasses import asdict

    from .config import PanopticTrainConfig

    d = asdict(PanopticTrainConfig())
    add = p.add_argument
    add("--data", default=d["data"], help="COCO-panoptic root (`crbp-fast panoptic generate` writes one)")
    add("--split", default=d["split"])
    add("--eval-split", default=d["eval_split"])
    add("--train-limit", type=int, default=d["train_limit"], help="first this many training images (default: all)")
    add("--eval-limit", type=int, default=d["eval_limit"], help="held-out images (0: no evaluation; default: all)")
    add("--backbone", default=d["backbone"])
    add("--trainable-layers", type=int, default=d["trainable_layers"])
    add("--fpn", default=d["fpn"], help="recurrent (RecurrentFPN) or torchvision (the feed-forward baseline)")
    add("--fpn-width", type=int, default=d["fpn_width"])
    add("--semantic-width", type=int, default=d["semantic_width"])
    add("--algorithm", default=d["algorithm"], help="bptt, cbptt, rbp or crbp")
    add("--steps", type=int, default=d["steps"], help="recurrent steps N per FPN level")
    add("--adjoint-steps", type=int, default=d["adjoint_steps"])
    add("--lcp-target", type=float, default=d["lcp_target"])
    add("--lcp-weight", type=float, default=d["lcp_weight"])
    add("--cell-backend", default=d["cell_backend"], help="hGRU backend: auto, torch, triton, native")
    add("--min-size", type=int, default=d["min_size"], help="torchvision's transform: shorter side")
    add("--max-size", type=int, default=d["max_size"], help="torchvision's transform: longest side")
    add("--anchor-sizes", type=int, nargs=5, default=d["anchor_sizes"], help="anchor size of P2..P6")
    add("--lr", type=float, default=d["lr"], help="Adam learning rate")
    add("--batch-size", type=int, default=d["batch_size"], help="images per process and step")
    add("--iterations", type=int, default=d["iterations"])
    add("--seed", type=int, default=d["seed"])
    add("--eval-every", type=int, default=d["eval_every"], help="0: at the end only")
    add("--no-eval-untrained", dest="eval_untrained", action="store_false",
        help="skip the untrained model's PQ at step 0")
    add("--checkpoint-every", type=int, default=d["checkpoint_every"])
    add("--log-every", type=int, default=d["log_every"])
    add("--out", default=d["out"])
    add("--resume", action="store_true")
    add("--device", default=d["device"])
    add("--workers", type=int, default=d["workers"])
    add("--threads", type=int, default=d["threads"])
    add("--no-progress", dest="progress", action="store_false")


def _generate(args: argparse.Namespace) -> int:
    _need_vision()
    from ...cli import CLIError
    from .data import write_synthetic

    try:
        for split, n in (("train", args.train), ("val", args.val)):
            paths = write_synthetic(args.out, split, n, size=args.size, seed=args.seed)
            print(f"wrote {n} {split} images: {paths.annotations}")
    except ValueError as err:
        raise CLIError(str(err)) from None
    return 0


def _train(args: argparse.Namespace) -> int:
    _need_vision()
    from ...cli import CLIError
    from ..pathfinder.train import CheckpointError, ConfigError, Interrupted
    from .data import PanopticDataError
    from .train import PanopticTrainConfig, train

    names = {f.name for f in dataclasses.fields(PanopticTrainConfig)}
    config = PanopticTrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        result = train(config)
    except Interrupted as stop:
        print(f"crbp-fast panoptic train: interrupted after step {stop.step}; checkpoint {stop.checkpoint}; "
              f"continue with the same command and --resume", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, PanopticDataError) as err:
        raise CLIError(str(err)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        if not result.losses:
            print(f"step {result.step}: the run had already reached its last step; nothing to do")
        else:
            def show(m: dict) -> str:
                return ", ".join(f"{k} {m[k]:.2f}" for k in ("pq", "sq", "rq")) if m else "not evaluated"
            print(f"step {result.step}: loss {result.losses[-1]:.4f}; held-out {show(result.metrics)} "
                  f"(untrained: {show(result.untrained)}); wrote {result.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    _need_vision()
    from ...cli import CLIError
    from ..pathfinder.train import CheckpointError, ConfigError
    from .data import PanopticDataError
    from .train import evaluate_checkpoint

    try:
        metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.limit, args.steps,
                                      args.batch_size, args.device)
    except (ConfigError, CheckpointError, PanopticDataError, ValueError) as err:
        raise CLIError(str(err)) from None
    print(json.dumps(metrics))
    if args.json is not None:
        args.json.write_text(json.dumps(metrics, indent=1) + "\n")
    return 0
