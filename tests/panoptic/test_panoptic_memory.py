"""The panoptic memory preset: C-RBP's saved-for-backward bytes flat in N, BPTT's growing."""

from __future__ import annotations

from crbp_fast.tasks.panoptic.memory import PRESETS, MemoryPreset, measure, table

import pytest
import torch

TINY = MemoryPreset(batch=1, height=64, width=96, backbone="resnet18", fpn_width=16, semantic_width=16,
                    anchor_sizes=(8, 16, 32, 64, 128))


def test_crbp_flat_and_bptt_growing_for_the_whole_model():
    cpu = torch.device("cpu")
    crbp = [measure(TINY, "crbp", n, cpu, cell_backend="torch")["saved"] for n in (2, 6)]
    bptt = [measure(TINY, "bptt", n, cpu, cell_backend="torch")["saved"] for n in (1, 3)]
    # The RPN / ROI sampling follows the FPN's output, so the heads' share varies a little with N.
    assert abs(crbp[1] - crbp[0]) < 0.05 * crbp[0], crbp
    # BPTT keeps every step: two more steps cost more than C-RBP's whole variation over 4 more.
    assert bptt[1] - bptt[0] > 2 * abs(crbp[1] - crbp[0]), (bptt, crbp)


def test_presets_state_their_sizes():
    assert (PRESETS["coco"].height, PRESETS["coco"].width, PRESETS["coco"].backbone) == (800, 1216, "resnet50")
    assert PRESETS["cpu"].bptt_steps == (1, 2, 3, 4, 5) and PRESETS["cpu"].crbp_steps == (5, 10, 20)
    assert table([]).startswith("| algorithm | N |")


def test_bench_panoptic_writes_rows_on_request_and_alias(tmp_path, capsys):
    from crbp_fast.bench.records import read_records
    from crbp_fast.cli import main

    tiny = ["--preset", "cpu", "--size", "64", "96", "--batch", "1", "--fpn-width", "16", "--cell-backend", "torch",
            "--threads", "2"]
    assert main(["bench", "panoptic", *tiny, "--bptt-steps", "1", "--crbp-steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| bptt | 1 |" in out and "| crbp | 2 |" in out and "wrote 2 rows to" in out
    (records,) = tmp_path.glob("*.jsonl")
    rows = read_records(records)
    assert [(r.algorithm, r.steps, r.status, r.peak_kind) for r in rows] == [
        ("bptt", 1, "ok", "saved_for_backward"), ("crbp", 2, "ok", "saved_for_backward")]
    assert rows[1].adjoint_iterations == 15 and rows[0].adjoint_iterations is None
    assert {(r.preset, r.batch, r.height, r.width, r.channels) for r in rows} == {("panoptic-cpu-custom", 1, 64, 96, 16)}
    # `crbp-fast panoptic memory` is the same command; without --out nothing is written.
    assert main(["panoptic", "memory", *tiny, "--bptt-steps", "--crbp-steps", "2"]) == 0
    assert "not written: pass --out DIR" in capsys.readouterr().out
    assert len(read_records(records)) == 2


@pytest.mark.parametrize("argv, message", [
    (["--preset", "imagenet"], "--preset: expected one of coco, cpu, got 'imagenet'"),
    (["--bptt-steps", "0"], "--bptt-steps: expected N >= 1, got 0"),
    (["--bptt-steps", "--crbp-steps"], "both are empty; nothing to measure"),
    (["--size", "16", "96"], "--size: expected H and W >= 32 (the backbone's stride), got 16 96"),
    (["--backbone", "vgg"], "--backbone: expected one of resnet18"),
    (["--cell-backend", "cuda"], "--cell-backend: expected one of auto"),
])
def test_bench_panoptic_errors_name_the_option(argv, message, capsys):
    from crbp_fast.cli import main

    assert main(["bench", "panoptic", *argv]) == 2
    assert message in capsys.readouterr().err
