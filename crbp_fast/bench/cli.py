"""``crbp-fast bench {memory,speed,phases,all,plot}``: what C-RBP costs against BPTT, as one command.

    crbp-fast bench all --quick            # CPU smoke run, about a minute on 2 cores
    crbp-fast bench all --paper            # B=32, C=25, 150x150, k=15, N up to 80 (a GPU)
    crbp-fast bench memory --steps 1 10 40 --algorithms bptt crbp --backends torch
    crbp-fast bench phases --batch 2 --size 150 --channels 25 --kernel-size 15 --speed-steps 10 \
        --adjoint-steps 10 --algorithms crbp --backends native --conv fft   # phases + roofline
    crbp-fast bench panoptic --preset cpu  # Panoptic FPN: BPTT 1-5 vs C-RBP 5-20 (torchvision)
    crbp-fast bench targets                # the iteration / step / VJP speed targets, met or missed
    crbp-fast bench plot                   # PNGs + Markdown from benchmarks/results/*.jsonl

Without ``--quick`` or ``--paper`` the preset is ``--paper`` on CUDA and ``--quick`` on CPU;
every other option overrides the preset's value. Rows are appended to
``<out>/<device-slug>.jsonl`` as each configuration is measured, so an interrupted run keeps
what it measured. On CUDA, float32 convolutions and matmuls run without TF32 unless ``--tf32``
(then both do): the direct (cuDNN) and FFT (matmul channel mix) engines are always compared at
equal precision, and every row records the setting.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from ..cli import CLIError
from ..conv.engines import CONV_NAMES
from ..engine.fixed_point import ALGORITHMS
from ..hgru.backends import BACKEND_NAMES
from .memory import run_memory
from .phases import machine_rates, run_phases
from .plot import latest, markdown, write_plots
from .records import Environment, RecordError, append_records, read_records, records_path
from .setups import PAPER_SHAPE, PRESETS, QUICK_SHAPE, SWEEP_BACKENDS, SWEEP_CONVS, Shape, Sweep, resolve_device
from .speed import run_speed

DEFAULT_OUT = Path("benchmarks") / "results"


SUITES_OF = {"memory": ("memory",), "speed": ("speed",), "phases": ("phases",), "all": ("memory", "speed")}


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Usage errors as one line and exit code 2 (argparse prints the whole usage otherwise)."""
    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error
    return parser


def register(subparsers, name: str, help_text: str) -> None:
    """Add ``crbp-fast <name> {memory,speed,all,plot}`` to the top-level CLI."""
    bench = _one_line_errors(subparsers.add_parser(name, help=help_text, description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="{memory,speed,phases,all,panoptic,targets,plot}")
    helps = {
        "memory": "peak memory of one training iteration as N grows",
        "speed": "time a step, an adjoint VJP and a training iteration",
        "phases": "time the phases of an rbp / crbp training iteration, each against its roofline",
        "all": "memory, then speed, then plots",
    }
    for command, text in helps.items():
        parser = _one_line_errors(sub.add_parser(command, help=text, description=text))
        _add_sweep_options(parser, snapshot=command not in ("speed", "phases"))
        parser.set_defaults(func=_run_sweep, suites=SUITES_OF[command], plots=command == "all")
    from ..tasks.panoptic.cli import add_memory_options  # no torchvision import until it runs

    add_memory_options(_one_line_errors(sub.add_parser(
        "panoptic", help="the panoptic FPN preset: memory of one iteration, BPTT 1-5 vs C-RBP 5-20 (torchvision)",
        description="Peak memory (saved for backward; CUDA max allocated) of one Panoptic FPN training iteration "
                    "with recurrent FPN laterals, BPTT at 1-5 steps against C-RBP at 5-20 (the paper's table). "
                    "Needs torchvision (scripts/setup_vision_env.sh).")))
    parser = _one_line_errors(sub.add_parser(
        "targets", help="the speed targets of a crbp iteration, a step and a VJP against the published algorithm",
        description="Times, in one process and interleaved (medians), a crbp training iteration with the defaults "
                    "against the published algorithm (torch / direct, adjoint and penalty through autograd) and "
                    "BPTT-6, their gradients' relative error, and a no-grad step and an adjoint VJP against "
                    "torch / direct; each ratio against its target (CPU: B=2 iteration >= 6x, B=4 step and VJP "
                    ">= 8x; CUDA: B=32, N=20, K=15 iteration >= 4x and faster than BPTT-6)."))
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    parser.add_argument("--repeats", type=int, default=3, metavar="R", help="interleaved rounds (default: 3)")
    parser.add_argument("--threads", type=int, metavar="T", help="torch.set_num_threads (default: 1 on CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny shape (B2-C4-24x24-k5, N=4, K=3): checks the command, measures nothing useful")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="also write the result as JSON (default: <out dir>/targets-<device-slug>.json)")
    parser.set_defaults(func=_run_targets)
    parser = _one_line_errors(sub.add_parser(
        "plot", help="PNG plots and a Markdown table from stored records",
        description="PNG plots (memory vs N, speed bars) and a Markdown table from stored records; the "
                    "latest run of each configuration counts.",
    ))
    parser.add_argument("--records", nargs="+", type=Path, metavar="FILE",
                        help=f"records files (default: {DEFAULT_OUT}/*.jsonl)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"where the PNGs go (default: {DEFAULT_OUT})")
    parser.set_defaults(func=_run_plot)


def _add_sweep_options(parser: argparse.ArgumentParser, snapshot: bool) -> None:
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help=f"small CPU run: {QUICK_SHAPE.id}, N {' '.join(map(str, PRESETS['quick'].steps))}")
    preset.add_argument("--paper", dest="preset", action="store_const", const="paper",
                        help=f"the paper's set-up: {PAPER_SHAPE.id}, N {' '.join(map(str, PRESETS['paper'].steps))}")
    add = parser.add_argument
    add("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    add("--steps", nargs="+", type=int, metavar="N", help="N values of the memory sweep")
    add("--speed-steps", nargs="+", type=int, metavar="N", help="N values of the timed training iterations")
    add("--algorithms", nargs="+", metavar="A", help=f"any of {' '.join(ALGORITHMS)} (default: all)")
    add("--backends", nargs="+", metavar="B",
        help=f"any of {' '.join(BACKEND_NAMES)} (default: {' '.join(SWEEP_BACKENDS)}; unavailable ones are skipped)")
    add("--conv", nargs="+", metavar="C",
        help=f"any of {' '.join(CONV_NAMES)} (default: {' '.join(SWEEP_CONVS)}, direct only with --quick; "
             f"unavailable ones are skipped)")
    add("--batch", type=int, metavar="B", help="batch size (default: the preset's)")
    add("--size", nargs="+", type=int, metavar="S", help="image size: S (square) or H W (default: the preset's)")
    add("--channels", type=int, metavar="C", help="channels of x and h (default: the preset's)")
    add("--kernel-size", type=int, metavar="K", help="odd size of the horizontal kernels (default: the preset's)")
    add("--adjoint-steps", type=int, metavar="K", help="J^T v products per backward (rbp/crbp)")
    add("--repeats", type=int, metavar="R", help="timed calls per speed measurement")
    add("--warmup", type=int, metavar="W", help="untimed calls before them (>= 1)")
    add("--threads", type=int, metavar="T", help="torch.set_num_threads (default: 1 with --quick)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="also time torch.compile of the reference step (default: on with --paper)")
    add("--compile-timeout", type=float, default=600.0, metavar="S", help="give up on torch.compile after S s")
    add("--tf32", action=argparse.BooleanOptionalAction, default=False,
        help="CUDA: allow TF32 in both cuDNN convolutions and matmuls (default: off, full float32 for both)")
    add("--no-rss", dest="rss", action="store_false",
        help="CPU: skip the peak RSS of a fresh child process per configuration")
    add("--rss-jobs", type=int, metavar="J", help="RSS child processes at a time (default: 2 with --quick, else 1)")
    if snapshot:
        add("--snapshot", type=Path, metavar="FILE",
            help="CUDA: write a memory snapshot of the sweep for https://pytorch.org/memory_viz")
    add("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
        help=f"where records (<device-slug>.jsonl) and plots go (default: {DEFAULT_OUT})")


# --------------------------------------------------------------------------------------------


def _names(option: str, given: list[str] | None, allowed: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    if given is None:
        return default
    unknown = [g for g in given if g not in allowed]
    if unknown:
        raise CLIError(f"{option}: unknown {', '.join(map(repr, unknown))}; expected any of {', '.join(allowed)}")
    return tuple(dict.fromkeys(given))


def _positive(option: str, value, minimum: int = 1):
    if value is not None and value < minimum:
        raise CLIError(f"{option}: expected a number >= {minimum}, got {value}")
    return value


def _positive_list(option: str, values: list[int] | None) -> tuple[int, ...] | None:
    if values is None:
        return None
    bad = [v for v in values if v < 1]
    if bad:
        raise CLIError(f"{option}: expected N >= 1, got {bad[0]}")
    return tuple(sorted(set(values)))


def _writable_dir(option: str, path: Path) -> Path:
    """Create ``path`` if needed and prove that a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise CLIError(f"{option}: cannot write to {str(path)!r}: {err.strerror or err}") from None
    return path


def records_file(out: Path, device_name: str) -> Path:
    """``<out>/<device-slug>.jsonl``, checked before a sweep appends to it: ``out`` writable, and
    the file, if there, writable and well-formed (rows are appended to it and plotted from it)."""
    path = records_path(_writable_dir("--out", out), device_name)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise CLIError(f"--out: the records file {str(path)!r} is not writable")
        try:
            read_records(path)
        except RecordError as err:
            raise CLIError(f"--out: the records file is malformed: {err}") from None
    return path


def build_sweep(args: argparse.Namespace) -> tuple[Sweep, str, int]:
    """The sweep, preset name and thread count of the parsed options; ``CLIError`` on bad input."""
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise CLIError(f"--{err}") from None
    name = args.preset or ("paper" if device.type == "cuda" else "quick")
    preset = PRESETS[name]
    size = args.size
    if size is not None and len(size) not in (1, 2):
        raise CLIError(f"--size: expected S or H W, got {len(size)} values")
    for option, value in (("--batch", args.batch), ("--channels", args.channels), ("--size", min(size or [1]))):
        _positive(option, value)
    height, width = (size * 2)[:2] if size else (preset.shape.height, preset.shape.width)
    shape = Shape(
        batch=args.batch or preset.shape.batch, channels=args.channels or preset.shape.channels,
        height=height, width=width,
        kernel_size=args.kernel_size if args.kernel_size is not None else preset.shape.kernel_size,
    )
    try:
        shape.check()
    except (ValueError, TypeError) as err:
        raise CLIError(
            f"shape {shape.id} (--batch/--channels/--size/--kernel-size) is rejected by the cell: {err}"
        ) from None
    threads = _positive("--threads", args.threads) or preset.threads or torch.get_num_threads()
    if not args.compile_timeout > 0:
        raise CLIError(f"--compile-timeout: expected seconds > 0, got {args.compile_timeout:g}")
    sweep = Sweep(
        device=device, shape=shape,
        algorithms=_names("--algorithms", args.algorithms, ALGORITHMS, ALGORITHMS),
        backends=_names("--backends", args.backends, BACKEND_NAMES, SWEEP_BACKENDS),
        convs=_names("--conv", args.conv, CONV_NAMES, preset.convs),
        steps=_positive_list("--steps", args.steps) or preset.steps,
        speed_steps=_positive_list("--speed-steps", args.speed_steps) or preset.speed_steps,
        adjoint_steps=_positive("--adjoint-steps", args.adjoint_steps, 0)
        if args.adjoint_steps is not None else preset.adjoint_steps,
        repeats=_positive("--repeats", args.repeats) or preset.repeats,
        warmup=_positive("--warmup", args.warmup) or preset.warmup,
        rss=args.rss, rss_jobs=_positive("--rss-jobs", args.rss_jobs) or preset.rss_jobs,
        compile=preset.compile if args.compile is None else args.compile,
        compile_timeout=args.compile_timeout,
    )
    return sweep, name, threads


def _run_sweep(args: argparse.Namespace) -> int:
    sweep, preset, threads = build_sweep(args)
    snapshot = getattr(args, "snapshot", None)
    if snapshot is not None:
        if sweep.device.type != "cuda":
            raise CLIError(f"--snapshot: records the CUDA caching allocator, but the device is {sweep.device}")
        _writable_dir("--snapshot", snapshot.parent)
    out = _writable_dir("--out", args.out)
    torch.set_num_threads(threads)
    if sweep.device.type == "cuda":
        # The direct engine is measured at its best: cuDNN picks its fastest algorithm per shape.
        torch.backends.cudnn.benchmark = True
        # One precision for both engines (torch's defaults differ: TF32 in cuDNN, not in matmuls).
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    elif args.tf32:
        raise CLIError(f"--tf32: TF32 exists on CUDA devices only, but the device is {sweep.device}")
    env = Environment.capture(sweep.device, preset)
    path = records_file(out, env.device_name)
    print(f"crbp-fast bench: {env.device_name} ({sweep.device}), {sweep.shape.id}, preset {preset}, "
          f"{threads} thread(s), algorithms {' '.join(sweep.algorithms)}")
    if not sweep.available_engines():
        raise CLIError(
            f"none of --backends {' '.join(sweep.backends)} x --conv {' '.join(sweep.convs)} can run on "
            f"{sweep.device} (see the notes above)"
        )
    written: list = []

    def emit(rows: list) -> None:
        append_records(path, rows)
        written.extend(rows)

    try:
        if "memory" in args.suites:
            run_memory(sweep, env, snapshot, emit)
        if "speed" in args.suites:
            run_speed(sweep, env, emit)
        if "phases" in args.suites:
            emit(run_phases(sweep, env, machine_rates(sweep.device)))
    finally:
        print(f"\nwrote {len(written)} rows to {path}")
    rows = written
    if snapshot is not None:
        print(f"wrote the CUDA memory snapshot to {snapshot} (open it at https://pytorch.org/memory_viz)")
    shown = rows
    if args.plots:
        key = (env.device_name, sweep.shape.id, "float32")
        shown = [r for r in latest(read_records(path)) if (r.device_name, r.shape_id, r.dtype) == key]
        for png in write_plots(shown, out):
            print(f"wrote {png}")
    print()
    print(markdown(shown))
    return 0


def _run_targets(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from .records import device_slug
    from .targets import SETTINGS, format_targets, measure_targets, write_targets

    device = resolve_device(args.device)
    repeats = _positive("--repeats", args.repeats)
    threads = _positive("--threads", args.threads) if args.threads is not None else (
        1 if device.type == "cpu" else torch.get_num_threads())
    setting = SETTINGS["cuda" if device.type == "cuda" else "cpu"]
    if args.quick:
        tiny = Shape(2, 4, 24, 24, 5)
        setting = replace(setting, iteration_shape=tiny, op_shape=tiny, steps=4, adjoint_steps=3)
    env = Environment.capture(device, "targets")
    out = args.out if args.out is not None else DEFAULT_OUT / f"targets-{device_slug(env.device_name)}.json"
    _writable_dir("--out", out.parent)
    torch.set_num_threads(threads)
    if device.type == "cuda":
        # As in the sweep: cuDNN at its fastest algorithm, both engines in full float32 (no TF32).
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"crbp-fast bench targets: {env.device_name} ({device}), iteration {setting.iteration_shape.id} "
          f"N={setting.steps} K={setting.adjoint_steps}, ops {setting.op_shape.id}, {threads} thread(s)", flush=True)
    result = measure_targets(device, setting, repeats, progress=lambda line: print("  " + line, flush=True))
    result["environment"] = asdict(env)
    write_targets(result, out)
    print(format_targets(result))
    print(f"wrote {out}")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    files = args.records if args.records is not None else sorted(DEFAULT_OUT.glob("*.jsonl"))
    if not files:
        raise CLIError(f"--records: no records given and no {DEFAULT_OUT}/*.jsonl here")
    rows = []
    for file in files:
        if not file.is_file():
            raise CLIError(f"--records: no such file {str(file)!r}")
        try:
            rows += read_records(file)
        except RecordError as err:
            raise CLIError(f"--records: {err}") from None
        except OSError as err:
            raise CLIError(f"--records: cannot read {str(file)!r}: {err.strerror or err}") from None
    if not rows:
        raise CLIError(f"--records: no rows in {', '.join(map(str, files))}")
    out = _writable_dir("--out", args.out)
    for png in write_plots(rows, out):
        print(f"wrote {png}")
    print()
    print(markdown(rows))
    return 0


__all__ = ["DEFAULT_OUT", "build_sweep", "records_file", "register"]
