"""The ``crbp-fast`` command line.

Each feature module adds its subcommand through a ``register(subparsers, name, help)`` function
that sets ``func`` on its parser; a ``CLIError`` raised there becomes a one-line error, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: (subcommand, module with ``register(subparsers)``, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "crbp_fast.demo", "train a small hGRU a few iterations with each algorithm"),
    ("pathfinder", "crbp_fast.data.cli", "generate Pathfinder datasets (shards) and preview samples"),
    ("train", "crbp_fast.train", "train a Pathfinder hGRU with bptt / cbptt / rbp / crbp (DDP via torchrun)"),
    ("diagnose", "crbp_fast.diagnose", "stability past the training N: metric per step, state space, KS test"),
    ("bench", "crbp_fast.bench.cli", "benchmark suite and memory profiler: what C-RBP costs against BPTT"),
    ("panoptic", "crbp_fast.panoptic.cli", "recurrent Panoptic FPN on torchvision: data, train, eval, memory"),
]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crbp-fast", description="C-RBP for recurrent vision models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, help_text in COMMANDS:
        importlib.import_module(module).register(sub, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"crbp-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Under `python -m crbp_fast.cli` this file runs as __main__, a module apart from the
    # crbp_fast.cli that the subcommands import CLIError from: call that module's main, or their
    # errors would not be caught here and would end in a traceback.
    from crbp_fast.cli import main as _main

    sys.exit(_main())
