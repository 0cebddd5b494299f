"""Every user error on the command line is one line naming the option, what was given and what is
expected, exit 2; never a traceback. Help texts print one default, and only a true one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crbp_fast import cli

TRAIN = ["train", "--size", "32", "--length", "4", "--channels", "4", "--kernel-size", "3", "--steps", "2",
         "--batch-size", "2", "--iterations", "1", "--eval-size", "0", "--no-progress", "--backend", "torch",
         "--threads", "1"]


def run(capsys, argv):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CASES = {
    "train-even-kernel": (TRAIN + ["--kernel-size", "4"], "kernel_size: expected a positive odd int, got 4"),
    "train-conv": (TRAIN + ["--conv", "winograd"], "conv: expected one of ('auto', 'direct', 'fft'), got 'winograd'"),
    "train-gate-bias-init": (TRAIN + ["--gate-bias-init", "zero"], "gate_bias_init: expected one of"),
    "train-triton-on-cpu": (TRAIN + ["--backend", "triton", "--device", "cpu"], "backend 'triton' cannot run on device cpu"),
    "train-lcp-target-nan": (TRAIN + ["--lcp-target", "nan"], "lcp_target: expected a finite number >= 0, got nan"),
    "train-out-is-file": (TRAIN + ["--out", "{file}"], "out: {file} is a file, expected a directory"),
    "train-out-in-file": (TRAIN + ["--out", "{file}/run"], "out: {file}/run is inside a file"),
    "preview-n-0": (["pathfinder", "preview", "-n", "0", "--out", "{tmp}/p.png"], "-n: expected the number of samples"),
    "preview-out-in-file": (["pathfinder", "preview", "-n", "1", "--length", "4", "--size", "32", "--out",
                             "{file}/p.png"], "{file}/p.png: Not a directory"),
    "generate-out-in-file": (["pathfinder", "generate", "-n", "1", "--length", "4", "--size", "32", "--no-progress",
                              "--out", "{file}/d"], "{file}/d: Not a directory"),
    "demo-iterations-0": (["demo", "--iterations", "0"], "--iterations: expected an int >= 1, got 0"),
    "demo-even-kernel": (["demo", "--kernel-size", "4"], "kernel_size: expected a positive odd int, got 4"),
    "demo-steps-0": (["demo", "--steps", "0", "5"], "--steps: expected values of N >= 1, got 0 5"),
    "bench-plot-png": (["bench", "plot", "--records", "{png}"], "--records: {png}:1: not text"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_exit_2(tmp_path, capsys, monkeypatch, case):
    argv, match = CASES[case]
    # The test session runs Triton under its CPU interpreter; a user's shell does not.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    file = tmp_path / "taken"
    file.write_text("x")
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    fill = dict(file=str(file), tmp=str(tmp_path), png=str(png))
    argv = [a.format(**fill) for a in argv]
    argv = argv + (["--out", str(tmp_path / "run")] if argv[0] == "train" and "--out" not in argv else [])
    code, _, err = run(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match.format(**fill) in lines[0], err


def test_module_entry_point_catches_its_own_errors(tmp_path):
    # `python -m crbp_fast.cli` (how torchrun launches training) ran the CLI as __main__, whose
    # CLIError was another class than the subcommands' one: every user error was a traceback.
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "crbp_fast.cli", *TRAIN, "--length", "99", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "crbp-fast train: error: length: expected an int contour length in 2..40, got 99"


@pytest.mark.parametrize("argv", [["train"], ["pathfinder", "generate"], ["pathfinder", "preview"], ["diagnose"]],
                         ids=lambda a: "-".join(a))
def test_help_shows_one_true_default(capsys, argv):
    code, out, _ = run(capsys, argv + ["--help"])
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert "(default: True)" not in text and "(default: False)" not in text
    for option_help in re.split(r" --?[a-z]", text):
        assert option_help.count("(default:") <= 1, option_help
