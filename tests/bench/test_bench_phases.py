"""The phase-broken-out training iteration of the bench (crbp_fast.bench.phases): the phases,
their roofline model, the machine rates and the rows they become."""

from __future__ import annotations

import json

import pytest
import torch
from test_bench_records import SHAPE, make_env, speed_row

from crbp_fast.bench.phases import PHASES, machine_rates, phase_model, phases_fn
from crbp_fast.bench.records import Record, RecordError
from crbp_fast.bench.setups import Shape, make_cell, make_inputs


@pytest.mark.parametrize("algorithm", ["rbp", "crbp"])
def test_phases_of_an_iteration_and_their_gradients(algorithm):
    shape = Shape(2, 3, 12, 11, 5)
    cell = make_cell(shape, "native", "fft", torch.device("cpu"))
    x = make_inputs(shape, torch.device("cpu"))
    times = phases_fn(cell, x, algorithm, steps=3, adjoint_steps=2)()
    expected = PHASES if algorithm == "crbp" else tuple(p for p in PHASES if p != "penalty")
    assert tuple(times) == expected and all(t > 0 for t in times.values())
    # The phases do the work of one fixed_point iteration: every parameter gets a gradient.
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())
    with pytest.raises(ValueError, match="algorithm: expected one of"):
        phases_fn(cell, x, "bptt", steps=3, adjoint_steps=2)


def test_phase_model_counts_grow_with_the_work():
    shape = Shape(2, 25, 150, 150, 15)
    fft = phase_model(shape, "native", "fft", "crbp", steps=10, adjoint_steps=10)
    direct = phase_model(shape, "torch", "direct", "crbp", steps=10, adjoint_steps=10)
    assert set(fft) == set(PHASES)
    assert "penalty" not in phase_model(shape, "native", "fft", "rbp", steps=10, adjoint_steps=10)
    assert direct["forward"][1] > 10 * fft["forward"][1]  # direct conv arithmetic dominates at k = 15
    longer = phase_model(shape, "native", "fft", "crbp", steps=20, adjoint_steps=10)
    assert longer["forward"][0] > fft["forward"][0] and longer["adjoint"] == fft["adjoint"]


def test_machine_rates_are_positive_and_finite():
    rates = machine_rates(torch.device("cpu"), repeats=1)
    assert 1e8 < rates.bandwidth < 1e13 and 1e8 < rates.gemm_flops < 1e15
    assert "GB/s" in rates.line(torch.device("cpu"))


def phase_row(env, **over):
    values = dict(suite="phases", measure="train_phase", phase="adjoint", algorithm="crbp", steps=10,
                  adjoint_steps=10, bytes_moved=10, flops=20, status="ok", backend="native", conv="fft",
                  repeats=3, median_s=0.01, p20_s=0.009, p80_s=0.011, images_per_s=200.0, **SHAPE)
    values.update(over)
    return env.record(**values)


def test_phase_rows_validate_and_round_trip():
    env = make_env()
    row = phase_row(env)
    assert Record.from_dict(json.loads(row.to_json())) == row
    for change, field in ((dict(phase=None), "phase"), (dict(phase="warmup"), "phase"),
                          (dict(flops=None), "flops"), (dict(measure="step"), "measure"),
                          (dict(bytes_moved=-1), "bytes_moved")):
        with pytest.raises(RecordError, match=field):
            phase_row(env, **change)
    with pytest.raises(RecordError, match="phase"):
        speed_row(env, phase="adjoint")


def test_rows_stored_before_the_phase_fields_still_read():
    data = json.loads(speed_row(make_env()).to_json())
    for name in ("phase", "bytes_moved", "flops"):
        del data[name]
    assert Record.from_dict(data).phase is None


def test_phase_model_fused_mix_moves_fewer_bytes():
    shape = Shape(2, 5, 24, 24, 5)
    plain = phase_model(shape, "native", "fft", "crbp", steps=4, adjoint_steps=3)
    fused = phase_model(shape, "native", "fft", "crbp", steps=4, adjoint_steps=3, fused_mix=True)
    for phase in plain:
        assert fused[phase][0] < plain[phase][0]
        assert fused[phase][1] == plain[phase][1]
