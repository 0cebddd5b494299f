"""The benchmark record schema: validation, JSON round trip, all-or-nothing appends."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from crbp_fast.bench.records import (
    Environment, Record, RecordError, append_records, device_slug, read_records, records_path,
)


def make_env(run_id: str = "run-1", timestamp: str = "2026-01-01T00:00:00+00:00") -> Environment:
    return Environment(
        run_id=run_id, timestamp=timestamp, preset="quick", device_type="cpu", device_name="Test CPU 9000",
        threads=1, tf32_matmul=None, tf32_cudnn=None, torch_version="2.13.0", triton_version=None, python_version="3.11.0",
        git_commit="0123456789abcdef", git_dirty=False,
    )


SHAPE = dict(batch=2, channels=4, height=8, width=8, kernel_size=3)


def memory_row(env: Environment, algorithm="crbp", steps=5, peak_bytes=1000, **over) -> Record:
    values = dict(suite="memory", measure="train_iteration", status="ok", algorithm=algorithm, backend="torch",
                  conv="direct", steps=steps, adjoint_steps=15, peak_kind="saved_for_backward",
                  peak_bytes=peak_bytes, **SHAPE)
    values.update(over)
    return env.record(**values)


def speed_row(env: Environment, measure="step", median=0.01, **over) -> Record:
    values = dict(suite="speed", measure=measure, status="ok", backend="torch", conv="direct", repeats=5,
                  median_s=median, p20_s=median * 0.9, p80_s=median * 1.1, images_per_s=2 / median, **SHAPE)
    values.update(over)
    return env.record(**values)


def test_valid_rows_round_trip():
    env = make_env()
    for row in (memory_row(env), speed_row(env),
                speed_row(env, "train_iteration", algorithm="bptt", steps=10, adjoint_steps=15),
                memory_row(env, peak_kind="rss", baseline_bytes=500),
                env.record(suite="speed", measure="compiled_step", status="unavailable", note="no compiler",
                           backend="torch", conv="direct", **SHAPE)):
        assert Record.from_dict(json.loads(row.to_json())) == row


def cuda_env() -> Environment:
    return dataclasses.replace(make_env(), device_type="cuda", device_name="NVIDIA H200", tf32_matmul=False,
                               tf32_cudnn=False)


def test_cuda_rows_say_which_float32_math_they_ran_under():
    row = speed_row(cuda_env(), conv="fft")
    assert (row.tf32_matmul, row.tf32_cudnn) == (False, False)
    assert Record.from_dict(json.loads(row.to_json())) == row
    with pytest.raises(RecordError, match="tf32_cudnn: a CUDA row must say whether TF32 was allowed"):
        speed_row(dataclasses.replace(cuda_env(), tf32_cudnn=None))
    with pytest.raises(RecordError, match="tf32_matmul: expected None on 'cpu'"):
        speed_row(dataclasses.replace(make_env(), tf32_matmul=True))


def test_schema_1_rows_are_read_with_the_tf32_fields_unknown(tmp_path):
    data = json.loads(memory_row(make_env()).to_json())
    del data["tf32_matmul"], data["tf32_cudnn"]
    data["schema"] = 1
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(data) + "\n")
    (row,) = read_records(path)
    assert row.schema == 2 and row.tf32_matmul is None and row.peak_bytes == data["peak_bytes"]


@pytest.mark.parametrize(("change", "field"), [
    (dict(batch="2"), "batch"),
    (dict(batch=True), "batch"),
    (dict(batch=0), "batch"),
    (dict(algorithm="sgd"), "algorithm"),
    (dict(suite="latency"), "suite"),
    (dict(peak_kind="vms"), "peak_kind"),
    (dict(peak_bytes=None), "peak_bytes"),
    (dict(peak_bytes=-1), "peak_bytes"),
    (dict(steps=None), "steps"),
    (dict(backend="auto"), "backend"),
    (dict(timestamp="yesterday"), "timestamp"),
    (dict(peak_kind="rss"), "baseline_bytes"),
    (dict(median_s=0.1), "median_s"),
    (dict(status="unavailable"), "note"),
    (dict(status="out_of_memory", note="OOM"), "peak_bytes"),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, dict) else str(v))
def test_invalid_rows_name_the_field(change, field):
    env = make_env()
    with pytest.raises(RecordError, match=field):
        memory_row(env, **change)


def test_speed_row_needs_ordered_quantiles():
    with pytest.raises(RecordError, match="p20_s <= median_s <= p80_s"):
        speed_row(make_env(), p20_s=0.5)
    with pytest.raises(RecordError, match="algorithm"):
        speed_row(make_env(), algorithm="crbp")


def test_from_dict_rejects_unknown_and_missing_fields():
    data = json.loads(memory_row(make_env()).to_json())
    with pytest.raises(RecordError, match="unknown fields"):
        Record.from_dict({**data, "colour": "red"})
    del data["suite"]
    with pytest.raises(RecordError, match="missing fields"):
        Record.from_dict(data)


def test_append_is_all_or_nothing(tmp_path):
    env = make_env()
    path = records_path(tmp_path, env.device_name)
    assert path.name == "test-cpu-9000.jsonl"
    first = [memory_row(env, steps=n) for n in (1, 2)]
    append_records(path, first)
    before = path.read_bytes()
    bad = memory_row(env, steps=3)
    object.__setattr__(bad, "peak_bytes", "lots")  # a row corrupted after construction
    with pytest.raises(RecordError, match="peak_bytes"):
        append_records(path, [memory_row(env, steps=4), bad])
    assert path.read_bytes() == before
    append_records(path, [speed_row(env)])
    rows = read_records(path)
    assert rows[:2] == first and rows[2].suite == "speed"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_read_records_names_the_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(memory_row(make_env()).to_json() + "\n{not json\n")
    with pytest.raises(RecordError, match=r"x\.jsonl:2"):
        read_records(path)


def test_device_slug_and_environment():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"
    env = Environment.capture(torch.device("cpu"), "quick")
    assert env.device_type == "cpu" and env.device_name and env.torch_version == torch.__version__
    assert env.git_commit is None or len(env.git_commit) == 40
    row = memory_row(env)
    assert dataclasses.asdict(row)["run_id"] == env.run_id


def test_append_keeps_ordinary_file_permissions(tmp_path):
    path = tmp_path / "r.jsonl"
    append_records(path, [memory_row(make_env())])
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0o600
    path.chmod(0o640)
    append_records(path, [memory_row(make_env())])
    assert path.stat().st_mode & 0o777 == 0o640
