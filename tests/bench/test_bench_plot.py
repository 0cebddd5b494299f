"""``crbp-fast bench plot``: PNGs and a Markdown table from a small record file; latest run wins."""

from __future__ import annotations

from crbp_fast.bench.plot import latest, markdown
from crbp_fast.bench.records import append_records, read_records, records_path
from crbp_fast.cli import main
from test_bench_records import SHAPE, make_env, memory_row, speed_row

MIB = 2**20


def write_two_runs(tmp_path):
    """An old run (bptt 9 MiB at N=4) superseded by a newer one (bptt 4 MiB), plus failures."""
    old = make_env("run-old", "2026-01-01T00:00:00+00:00")
    new = make_env("run-new", "2026-01-02T00:00:00+00:00")
    rows = [memory_row(old, "bptt", 4, 9 * MIB), speed_row(old, median=0.5)]
    for n in (1, 2, 4):
        rows.append(memory_row(new, "bptt", n, n * MIB))
        rows.append(memory_row(new, "crbp", n, 3 * MIB))
        rows.append(memory_row(new, "bptt", n, (n + 200) * MIB, peak_kind="rss", baseline_bytes=200 * MIB))
    rows.append(new.record(suite="memory", measure="train_iteration", status="out_of_memory", note="CUDA OOM",
                           algorithm="bptt", backend="torch", conv="direct", steps=8, adjoint_steps=15, **SHAPE))
    rows += [speed_row(new, median=0.002), speed_row(new, "vjp", median=0.003),
             speed_row(new, "train_iteration", 0.02, algorithm="crbp", steps=4, adjoint_steps=15),
             new.record(suite="speed", measure="compiled_step", status="unavailable", note="no C++ compiler",
                        backend="torch", conv="direct", **SHAPE)]
    path = records_path(tmp_path, new.device_name)
    append_records(path, rows)
    return path


def test_latest_keeps_the_newest_run_per_configuration(tmp_path):
    rows = latest(read_records(write_two_runs(tmp_path)))
    assert {r.run_id for r in rows} == {"run-new"}
    bptt4 = [r for r in rows if r.algorithm == "bptt" and r.steps == 4 and r.peak_kind == "saved_for_backward"]
    assert [r.peak_bytes for r in bptt4] == [4 * MIB]


def test_plot_command_writes_pngs_and_table(tmp_path, capsys):
    path = write_two_runs(tmp_path)
    out = tmp_path / "plots"
    assert main(["bench", "plot", "--records", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["test-cpu-9000_B2-C4-H8-W8-k3_memory.png", "test-cpu-9000_B2-C4-H8-W8-k3_speed.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### Test CPU 9000, B2-C4-H8-W8-k3, float32" in text
    # saved for backward: bptt 1, 2, 4 MiB then OOM at N=8 (ratio over measured N), crbp flat.
    assert "| bptt | torch | direct | 1 | 2 | 4 | OOM | 4.000 |" in text
    assert "| crbp | torch | direct | 3 | 3 | 3 |  | 1.000 |" in text
    # rss: peak - baseline [raw peak]
    assert "| bptt | torch | direct | 1 [201] | 2 [202] | 4 [204] | OOM | 4.000 |" in text
    assert "| step |  | torch | direct |  | 2 | 1.8-2.2 | 1000 |" in text
    assert "| compiled_step |  | torch | direct |  | n/a | | |" in text
    assert "- compiled_step torch/direct: no C++ compiler" in text


def test_markdown_of_memory_only_rows_has_no_speed_section():
    env = make_env()
    text = markdown([memory_row(env, "rbp", n, 5 * MIB) for n in (1, 10)])
    assert "| rbp | torch | direct | 5 | 5 | 1.000 |" in text and "Speed" not in text
