"""``crbp-fast pathfinder generate | preview``: write a Pathfinder dataset, or look at samples.

Example:
    crbp-fast pathfinder generate --task segmentation --length 14 -n 20000 --out data/pf14_seg --workers 8
    crbp-fast pathfinder preview --task segmentation --length 14 -n 8 --out pf14.png
    crbp-fast pathfinder preview --data data/pf14_seg --out pf14_disk.png
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .dataset import ShardedPathfinder, write_shards
from .generator import TASKS, PathfinderError, generate


def _generate(args: argparse.Namespace) -> int:
    from ...cli import CLIError

    t0 = time.perf_counter()
    try:
        index = write_shards(
            args.out, args.n, args.task, args.length, args.size, args.seed, shard_size=args.shard_size,
            workers=args.workers, progress=not args.no_progress,
        )
    except (ValueError, FileExistsError, PathfinderError) as err:
        raise CLIError(str(err)) from None
    seconds = time.perf_counter() - t0
    print(f"wrote {args.n} {args.task} images (length {args.length}, {args.size}x{args.size}) to {index.parent} "
          f"in {seconds:.1f} s ({args.n / seconds:.0f} images/s with {args.workers} worker(s))")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from ...cli import CLIError

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.n < 1:
        raise CLIError(f"-n: expected the number of samples, an int >= 1, got {args.n}")
    try:
        if args.data is not None:
            ds = ShardedPathfinder(args.data)
            count = min(args.n, ds.n)
            pairs = [ds.raw(i) for i in range(count)]
            images = np.stack([p[0] for p in pairs])
            targets = np.stack([p[1] for p in pairs])
            task, length, size = ds.task, ds.length, ds.size
        else:
            images, targets = generate(args.n, args.task, args.length, args.size, args.seed)
            task, length, size = args.task, args.length, args.size
    except (ValueError, PathfinderError) as err:  # ShardError is a ValueError
        raise CLIError(str(err)) from None
    cols = min(len(images), 4)
    rows = -(-len(images) // cols)
    panels = 2 if task == "segmentation" else 1
    # constrained layout keeps each row's titles clear of the row above (tight_layout with a
    # suptitle let the second row's titles slide under the first row's images)
    fig, axes = plt.subplots(rows, cols * panels, figsize=(2.6 * cols * panels, 2.9 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        ax = axes[r, c * panels]
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if task == "segmentation":
            ax.set_title(f"#{i}", fontsize=8)
            overlay = np.stack([image[0] / 255.0] * 3, axis=-1) * 0.5
            overlay[..., 0] = np.maximum(overlay[..., 0], targets[i][0].astype(float))
            axes[r, c * panels + 1].imshow(overlay, interpolation="nearest")
            axes[r, c * panels + 1].set_title(f"#{i} mask ({int(targets[i].sum())} px)", fontsize=8)
        else:
            ax.set_title(f"#{i} label {int(targets[i])} ({'connected' if targets[i] else 'not connected'})", fontsize=8)
    fig.suptitle(f"Pathfinder {task}, length {length}, {size}x{size}", fontsize=10)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add ``crbp-fast pathfinder`` with its ``generate`` and ``preview`` subcommands."""
    from ...cli import DefaultsHelpFormatter

    p = subparsers.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="pathfinder_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--task", default="segmentation", choices=TASKS, help="which variant")
        q.add_argument("--length", type=int, default=14, help="paddles per target contour (2..40)")
        q.add_argument("--size", type=int, default=150, help="image side (drawn at twice this)")
        q.add_argument("--seed", type=int, default=0, help="dataset seed; sample i depends on (seed, i) only")

    g = sub.add_parser("generate", help="write a dataset as checksummed shards",
                       formatter_class=DefaultsHelpFormatter)
    common(g)
    g.add_argument("-n", type=int, required=True, help="number of images (indices 0 .. n-1)")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    g.add_argument("--workers", type=int, default=1, help="processes drawing shards in parallel")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.set_defaults(func=_generate)

    v = sub.add_parser("preview", help="write a PNG grid of samples with their masks or labels",
                       formatter_class=DefaultsHelpFormatter)
    common(v)
    v.add_argument("-n", type=int, default=8, help="number of samples")
    v.add_argument("--data", default=None, help="preview a generated directory instead of drawing")
    v.add_argument("--out", required=True, help="PNG file")
    v.set_defaults(func=_preview)


