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
    ("pathfinder", "crbp_fast.tasks.pathfinder.data_cli", "generate Pathfinder datasets (shards) and preview samples"),
    ("train", "crbp_fast.tasks.pathfinder.train", "train a Pathfinder hGRU with bptt / cbptt / rbp / crbp (DDP via torchrun)"),
    ("diagnose", "crbp_fast.tasks.pathfinder.diagnose", "stability past the training N: metric per step, state space, KS test"),
    ("figure1", "crbp_fast.tasks.pathfinder.figure1",
     "reproduce Figure 1 at CPU scale: data, BPTT / C-BPTT / C-RBP / RBP training, F1 per step, figures"),
    ("bench", "crbp_fast.bench.cli", "benchmark suite and memory profiler: what C-RBP costs against BPTT"),
    ("panoptic", "crbp_fast.tasks.panoptic.cli", "recurrent Panoptic FPN on torchvision: data, train, eval, memory"),
]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help once, and only where it says something.

    argparse's ArgumentDefaultsHelpFormatter appends it to every option, so a help text that
    already explains its default got a second one (``(default: trained) (default: None)``) and
    a flag got its internal value (``--no-progress ... (default: True)``).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


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
    except OSError as err:
        # A file the user named cannot be read or written (read-only --out, a file where a
        # folder is expected, a full disk): the environment's fault, so one line, not a traceback.
        where = f"{err.filename}: " if err.filename else ""
        print(f"crbp-fast {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # ``python -m crbp_fast.cli`` (as torchrun launches it) runs this file as ``__main__``; the
    # subcommands raise ``crbp_fast.cli.CLIError``, which is another class than ``__main__``'s,
    # so run the imported module's main for its errors to be caught.
    from crbp_fast.cli import main as _main

    sys.exit(_main())
