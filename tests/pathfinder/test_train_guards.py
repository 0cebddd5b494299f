"""The trainer guards its output folder and its data: one run per --out (a lock), resume only on
the data the checkpoint was trained on (a fingerprint), no temporaries left by a killed run, and
an --out that cannot be written is a one-line error."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from test_train import tiny

from crbp_fast.tasks.pathfinder import dataset as pds
from crbp_fast.tasks.pathfinder.train import CheckpointError, ConfigError, read_checkpoint, train


def test_second_run_into_the_same_out_is_refused(tmp_path):
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first_run():
        def hold(step):
            inside.set()
            release.wait(60)
        try:
            train(tiny(tmp_path, iterations=1, eval_size=0), after_step=hold)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert inside.wait(60), "the first run never reached its first step"
        with pytest.raises(ConfigError, match=rf"out: .*run is in use by another training run \(pid {os.getpid()}\)"):
            train(tiny(tmp_path, iterations=1, eval_size=0))
    finally:
        release.set()
        thread.join(60)
    assert not errors, errors
    # The refused run touched nothing: the folder holds the first run's files only.
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1
    # The lock went with the first run: a new one may resume it.
    assert train(tiny(tmp_path, iterations=2, eval_size=0, resume=True)).step == 2


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pt.tmp4242", out / ".log.jsonl.tmp17", out / ".config.json.tmp9"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    kept = out / ".checkpoint.pt.tmp-notes"  # not a name the trainer writes: left alone
    kept.write_text("mine")
    train(tiny(tmp_path, iterations=1, eval_size=0))
    assert not any(path.exists() for path in stale)
    assert kept.exists()


@pytest.mark.parametrize("kind", ["file", "inside-file", "read-only"])
def test_unwritable_out_is_named(tmp_path, kind):
    target = tmp_path / "taken"
    target.write_text("x")
    if kind == "file":
        out, match = target, "out: .*taken is a file, expected a directory"
    elif kind == "inside-file":
        out, match = target / "run", "out: .*taken/run is inside a file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out, match = ro / "run", "out: cannot write to .*ro/run: Permission denied"
    with pytest.raises(ConfigError, match=match):
        train(tiny(tmp_path, out=str(out), iterations=1, eval_size=0))


def _shards(path, n, seed=0):
    pds.write_shards(path, n, "segmentation", 4, 32, seed=seed, shard_size=4, progress=False)
    return str(path)


@pytest.mark.parametrize("change", ["other-dataset", "other-n", "on-the-fly", "to-shards", "other-train-size"])
def test_resume_on_other_data_is_refused_naming_both(tmp_path, change):
    first = dict(data=_shards(tmp_path / "a", 8)) if change not in ("to-shards", "other-train-size") else {}
    if change == "other-train-size":
        first = dict(train_size=8)
    train(tiny(tmp_path, iterations=1, eval_size=0, **first))
    again = {
        "other-dataset": dict(data=_shards(tmp_path / "b", 8, seed=0)),  # same parameters, regenerated: same content
        "other-n": dict(data=_shards(tmp_path / "c", 12)),
        "on-the-fly": {},
        "to-shards": dict(data=_shards(tmp_path / "d", 8)),
        "other-train-size": dict(train_size=12),
    }[change]
    config = tiny(tmp_path, iterations=2, eval_size=0, resume=True, **again)
    if change == "other-dataset":
        # Identical content under another path (a moved or copied dataset) resumes.
        assert train(config).step == 2
        return
    if change == "other-train-size":
        # train_size is part of the config; the config check already names it.
        with pytest.raises(CheckpointError, match="train-size is 12 but the checkpoint was trained with 8"):
            train(config)
        return
    with pytest.raises(CheckpointError, match="checkpoint was trained on .* but this run's data is .*differ in"):
        train(config)


def test_checkpoint_records_the_data_fingerprint(tmp_path):
    data = _shards(tmp_path / "a", 8)
    train(tiny(tmp_path, iterations=1, eval_size=0, data=data))
    fp = read_checkpoint(tmp_path / "run" / "checkpoint.pt")["data"]
    assert fp == pds.ShardedPathfinder(data).fingerprint()
    assert fp["source"] == "shards" and fp["n"] == 8 and len(fp["content_sha256"]) == 64


def test_resume_refuses_a_dataset_whose_content_changed(tmp_path):
    data = tmp_path / "a"
    _shards(data, 8)
    train(tiny(tmp_path, iterations=1, eval_size=0, data=str(data)))
    # Same generation parameters and n, another content (e.g. regenerated by another generator version).
    other = tmp_path / "b"
    _shards(other, 8, seed=1)
    index = (other / "index.json").read_text().replace('"seed": 1', '"seed": 0')
    (other / "index.json").write_text(index)
    with pytest.raises(CheckpointError, match=r"differ in: content_sha256"):
        train(tiny(tmp_path, iterations=2, eval_size=0, resume=True, data=str(other)))


def test_losses_after_resume_match_when_the_data_is_the_same(tmp_path):
    data = _shards(tmp_path / "a", 8)
    whole = train(tiny(tmp_path, out=str(tmp_path / "whole"), iterations=2, eval_size=0, data=data))
    train(tiny(tmp_path, iterations=1, eval_size=0, data=data))
    rest = train(tiny(tmp_path, iterations=2, eval_size=0, data=data, resume=True))
    assert torch.tensor(rest.losses).tolist() == whole.losses[1:]
