"""``crbp-fast bench targets``: the interleaved target timings, their JSON and their verdicts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crbp_fast.bench.targets import _row, format_targets
from crbp_fast.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_every_target_with_a_verdict(tmp_path, capsys):
    out = tmp_path / "targets.json"
    assert main(["bench", "targets", "--quick", "--repeats", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["crbp iteration vs published", "crbp iteration vs bptt6",
                     "gradients: worst parameter relative error", "no-grad step vs torch/direct",
                     "adjoint VJP vs torch/direct"]
    for row in result["rows"]:
        assert math.isfinite(row["value"]) and row["value"] > 0
        assert row["status"] in ("met", "missed", "no target")
        assert row["name"] in printed and row["status"] in printed
    # The default path's gradients are the published algorithm's (float32, same weights and input).
    grads = result["rows"][2]
    assert grads["value"] < 1e-4 and grads["status"] == "met"
    assert set(result["grad_rel_err"]) >= {"w_gate_inh", "w_gate_exc", "alpha", "mu", "u1_gate.weight"}
    assert result["repeats"] == 2 and result["setting"]["iteration_shape"] == "B2-C4-H24-W24-k5"
    for name in ("published crbp", "default crbp", "default bptt6"):
        assert len(result["samples_s"][name]) == 2 and result["median_s"][name] > 0
    for name in ("step default", "vjp default"):
        assert len(result["samples_s"][name]) == 5  # the op timings take at least 5 rounds
    assert result["environment"]["device_name"] and not list(tmp_path.glob("*.tmp"))


def test_bad_repeats_is_one_line(tmp_path, capsys):
    assert main(["bench", "targets", "--quick", "--repeats", "0", "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["crbp-fast bench: error: --repeats: expected a number >= 1, got 0"]
    assert not (tmp_path / "t.json").exists()


def test_verdicts():
    assert _row("x", 6.1, 6.0)["status"] == "met" and _row("x", 5.9, 6.0)["status"] == "missed"
    assert _row("gradients", 2e-5, 1e-4, lower_is_better=True)["status"] == "met"
    assert _row("gradients", 2e-4, 1e-4, lower_is_better=True)["status"] == "missed"
    assert _row("x", 3.0, None)["status"] == "no target"
    table = format_targets({"device": "cpu", "threads": 1, "repeats": 1, "median_s": {"a": 1.0},
                            "rows": [_row("crbp iteration vs published", 5.17, 6.0)]})
    assert "5.17x" in table and ">= 6x" in table and "missed" in table
