"""``crbp-fast bench`` on bad input: one line on stderr, exit code 2, no traceback, no rows; and on
failures mid-run: every finished row kept, none half-written."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

import crbp_fast.bench.cli as bench_cli
from crbp_fast.bench.records import cpu_model_name, device_slug, read_records
from crbp_fast.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the quick preset uses (the CLI sets it process-wide); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TINY = ["--batch", "2", "--size", "8", "--channels", "2", "--kernel-size", "3", "--backends", "torch",
        "--conv", "direct", "--steps", "1", "2", "--speed-steps", "2", "--repeats", "2", "--no-rss"]


def run_cli(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BAD_INPUT = {
    "unknown-algorithm": (["--algorithms", "crbp", "sgd"], "--algorithms: unknown 'sgd'"),
    "unknown-backend": (["--backends", "cuda-graphs"], "--backends: unknown 'cuda-graphs'"),
    "unknown-conv": (["--conv", "winograd"], "--conv: unknown 'winograd'"),
    "even-kernel": (["--kernel-size", "4"], "kernel_size: expected a positive odd int, got 4"),
    "zero-batch": (["--batch", "0"], "--batch: expected a number >= 1, got 0"),
    "batch-not-int": (["--batch", "two"], "argument --batch: invalid int value: 'two'"),
    "size-three-values": (["--size", "8", "8", "8"], "--size: expected S or H W, got 3 values"),
    "zero-steps": (["--steps", "0", "5"], "--steps: expected N >= 1, got 0"),
    "bad-device": (["--device", "tpu"], "--device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    "snapshot-on-cpu": (["--device", "cpu", "--snapshot", "snap.pickle"], "--snapshot: records the CUDA"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_no_rows(case, tmp_path, capsys):
    extra, message = BAD_INPUT[case]
    out = tmp_path / "results"
    code, _, err = run_cli(capsys, ["bench", "all", *TINY, *extra, "--out", str(out)])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("crbp-fast bench") and message in err, err
    assert not list(tmp_path.rglob("*.jsonl"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["bench", "memory", *TINY, "--device", "cuda", "--out", str(tmp_path)])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--device: 'cuda' was asked for, but this torch" in err
    assert not list(tmp_path.iterdir())


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, ["bench", "speed", *TINY, "--out", str(blocker / "results")])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--out: cannot write to '{blocker / 'results'}'" in err


def test_missing_subcommand_and_bad_records(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["bench"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, ["bench", "plot", "--records", str(tmp_path / "none.jsonl")])
    assert code == 2 and "--records: no such file" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"suite": "memory"}\n')
    code, _, err = run_cli(capsys, ["bench", "plot", "--records", str(bad), "--out", str(tmp_path)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.jsonl:1: row: missing fields" in err


def test_malformed_records_file_is_refused_before_the_sweep(tmp_path, capsys):
    records = tmp_path / "results"
    records.mkdir()
    (records / f"{device_slug(cpu_model_name())}.jsonl").write_text("{truncated\n")
    code, out, err = run_cli(capsys, ["bench", "memory", *TINY, "--device", "cpu", "--out", str(records)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "the records file is malformed" in err
    assert "memory" not in out


def test_a_failure_mid_run_keeps_the_rows_measured_before_it(tmp_path, capsys, monkeypatch):
    def broken_speed(sweep, env, emit):
        raise RuntimeError("the speed suite broke after the memory suite ran")

    monkeypatch.setattr(bench_cli, "run_speed", broken_speed)
    with pytest.raises(RuntimeError, match="speed suite broke"):
        main(["bench", "all", *TINY, "--algorithms", "rbp", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*.jsonl")
    rows = read_records(path)
    assert [(r.suite, r.algorithm, r.steps) for r in rows] == [("memory", "rbp", 1), ("memory", "rbp", 2)]
    assert "wrote 2 rows" in capsys.readouterr().out


_KILLED_MID_SPEED = """
import os, signal, sys
import crbp_fast.bench.speed as speed
real, calls = speed._timed_row, []
def timed_row(*args):
    calls.append(1)
    if len(calls) == 3:  # SIGKILL in the middle of the third measurement: no handler runs
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
speed._timed_row = timed_row
from crbp_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_keeps_every_row_it_finished(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_SPEED, "bench", "speed", *TINY, "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (path,) = tmp_path.glob("*.jsonl")
    rows = read_records(path)  # every line parses: nothing half-written
    assert [r.measure for r in rows] == ["step", "elementwise"] and all(r.status == "ok" for r in rows)
    assert not list(tmp_path.glob(".*.tmp"))


def test_tf32_is_refused_on_cpu(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["bench", "speed", *TINY, "--device", "cpu", "--tf32", "--out", str(tmp_path)])
    assert code == 2 and "--tf32: TF32 exists on CUDA devices only" in err


def test_python_m_cli_errors_are_one_line_too(tmp_path):
    """`python -m crbp_fast.cli` (what scripts/gpu_checks.sh runs) reports a user error as the
    installed command does: one line, exit code 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "crbp_fast.cli", "bench", "memory", "--batch", "0", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == ["crbp-fast bench: error: --batch: expected a number >= 1, got 0"]


def test_panoptic_preset_without_torchvision_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    # The core environment has no torchvision; set it missing in any environment.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    assert main(["bench", "panoptic", "--preset", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "crbp-fast bench: error: the panoptic memory preset needs torchvision; torchvision does not import" in err
    assert "scripts/setup_vision_env.sh" in err and not list(tmp_path.iterdir())
