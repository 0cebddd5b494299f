"""End to end: the memory profile shows BPTT's O(N) against RBP's and C-RBP's O(1)."""

from __future__ import annotations

import pytest
import torch

from crbp_fast.bench.memory import SavedTensorBytes, run_memory
from crbp_fast.bench.records import Environment, read_records
from crbp_fast.bench.setups import Shape, Sweep
from crbp_fast.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the quick preset uses (the CLI sets it process-wide); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

SHAPE = Shape(batch=2, channels=4, height=12, width=12, kernel_size=3)


def test_saved_bytes_flat_for_rbp_and_crbp_linear_for_bptt():
    sweep = Sweep(
        device=torch.device("cpu"), shape=SHAPE, algorithms=("bptt", "cbptt", "rbp", "crbp"), backends=("torch",),
        convs=("direct",), steps=(2, 4, 8), speed_steps=(2,), adjoint_steps=5, repeats=1, warmup=1, rss=False,
    )
    rows = run_memory(sweep, Environment.capture(sweep.device, "quick"))
    assert all(r.status == "ok" and r.peak_kind == "saved_for_backward" for r in rows)
    saved = {(r.algorithm, r.steps): r.peak_bytes for r in rows}
    for algorithm in ("rbp", "crbp"):
        assert saved[algorithm, 8] / saved[algorithm, 2] <= 1.05, saved
    for algorithm in ("bptt", "cbptt"):
        per_step = (saved[algorithm, 4] - saved[algorithm, 2]) / 2
        assert per_step > 0
        # linear: 4 more steps cost twice what 2 more steps cost
        assert abs((saved[algorithm, 8] - saved[algorithm, 4]) / 4 - per_step) <= 0.01 * per_step, saved
    assert {r.adjoint_iterations for r in rows if r.algorithm in ("rbp", "crbp")} == {5}


def test_saved_tensor_bytes_counts_unique_storages():
    w = torch.randn(256, requires_grad=True)  # 1 KiB
    with SavedTensorBytes() as saved:
        y = (w * w).sum()  # saves w twice: one storage
    y.backward()
    assert saved.total == 1024


def test_bench_all_writes_records_and_plots(tmp_path, capsys):
    argv = ["bench", "all", "--device", "cpu", "--batch", "2", "--size", "8", "--channels", "2", "--kernel-size", "3",
            "--algorithms", "bptt", "crbp", "--backends", "torch", "--conv", "direct", "--steps", "1", "6",
            "--speed-steps", "2", "--repeats", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (records,) = tmp_path.glob("*.jsonl")
    rows = read_records(records)
    assert len({r.run_id for r in rows}) == 1
    kinds = {(r.algorithm, r.steps, r.peak_kind) for r in rows if r.suite == "memory" and r.status == "ok"}
    assert kinds == {(a, n, k) for a in ("bptt", "crbp") for n in (1, 6) for k in ("saved_for_backward", "rss")}
    rss = {(r.algorithm, r.steps): r for r in rows if r.peak_kind == "rss"}
    assert all(r.peak_bytes >= r.baseline_bytes > 0 for r in rss.values())
    measures = sorted(r.measure for r in rows if r.suite == "speed" and r.status == "ok")
    assert measures == ["elementwise", "step", "train_iteration", "train_iteration", "vjp"]
    assert sorted(p.suffix for p in tmp_path.glob("*.png")) == [".png", ".png"]
    assert "| crbp | torch | direct |" in out and "wrote 13 rows" in out
