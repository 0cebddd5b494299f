"""``crbp-fast panoptic train`` / ``eval``: log, checkpoint, exact resume, CLI, errors."""

from __future__ import annotations

import json

import pytest

from crbp_fast.cli import main
from crbp_fast.tasks.panoptic.train import PanopticTrainConfig, evaluate_checkpoint, read_checkpoint, train
from crbp_fast.tasks.pathfinder.train import CheckpointError


def _config(root, out, **kw) -> PanopticTrainConfig:
    base = dict(data=str(root), fpn_width=16, semantic_width=16, steps=2, cell_backend="torch", batch_size=2,
                iterations=4, eval_limit=2, checkpoint_every=2, out=str(out), progress=False, threads=2)
    base.update(kw)
    return PanopticTrainConfig(**base)


def test_train_writes_log_checkpoint_and_resumes_exactly(panoptic_root, tmp_path):
    full = train(_config(panoptic_root, tmp_path / "full"))
    assert full.step == 4 and len(full.losses) == 4
    assert set(full.metrics) >= {"pq", "sq", "rq"} and set(full.untrained) >= {"pq", "sq", "rq"}
    records = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert records[1]["adjoint_iterations"] == 15 and records[1]["penalty"] is not None
    ckpt = read_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert ckpt["step"] == 4 and ckpt["things"] == [1, 2, 3] and ckpt["stuffs"] == [4, 5]

    # Stop after 2 steps, then resume to 4: the same losses as the uninterrupted run.
    # (eval_limit=0: no evaluation, which the losses do not depend on; it keeps the test short.)
    half = train(_config(panoptic_root, tmp_path / "split", iterations=2, eval_limit=0))
    rest = train(_config(panoptic_root, tmp_path / "split", iterations=4, eval_limit=0, resume=True))
    assert half.losses + rest.losses == pytest.approx(full.losses, rel=1e-6)
    assert rest.untrained == {} and rest.metrics == {}

    with pytest.raises(CheckpointError, match="exists; pass --resume"):
        train(_config(panoptic_root, tmp_path / "full"))
    with pytest.raises(CheckpointError, match="--steps is 3 but the checkpoint was trained with 2"):
        train(_config(panoptic_root, tmp_path / "full", steps=3, iterations=6, resume=True))

    # Eval of the checkpoint at its own steps reproduces the run's final PQ.
    assert evaluate_checkpoint(tmp_path / "full" / "checkpoint.pt", limit=2)["pq"] == pytest.approx(full.metrics["pq"])


def test_cli_generate_train_eval(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "run"
    assert main(["panoptic", "generate", "--out", str(root), "--train", "4", "--val", "2", "--size", "48"]) == 0
    assert main(["panoptic", "train", "--data", str(root), "--iterations", "2", "--batch-size", "2",
                 "--fpn-width", "16", "--semantic-width", "16", "--steps", "2", "--min-size", "48",
                 "--max-size", "48", "--no-eval-untrained", "--cell-backend", "torch", "--out", str(out),
                 "--no-progress"]) == 0
    assert "step 2: loss" in capsys.readouterr().out
    metrics_file = tmp_path / "metrics.json"
    # Run past the training steps (the paper's stability test) with --steps.
    assert main(["panoptic", "eval", "--checkpoint", str(out / "checkpoint.pt"), "--steps", "6",
                 "--json", str(metrics_file)]) == 0
    assert set(json.loads(metrics_file.read_text())) >= {"pq", "sq", "rq"}


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["panoptic", "train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "crbp-fast panoptic: error: root / split: no" in err and "panoptic_train.json" in err
    assert main(["panoptic", "eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_one_run_per_folder_and_resume_only_on_the_same_data(panoptic_root, tmp_path):
    from crbp_fast.tasks.panoptic.data import write_synthetic
    from crbp_fast.tasks.runs import ConfigError, OutputLock

    out = tmp_path / "run"
    held = OutputLock(out)  # another run holding the folder
    try:
        with pytest.raises(ConfigError, match=r"is in use by another training run \(pid \d+\)"):
            train(_config(panoptic_root, out, iterations=1, eval_limit=0))
    finally:
        held.release()
    (out / ".checkpoint.pt.tmp12345").write_bytes(b"half a checkpoint of a killed run")
    train(_config(panoptic_root, out, iterations=1, eval_limit=0))
    assert not (out / ".checkpoint.pt.tmp12345").exists()
    assert read_checkpoint(out / "checkpoint.pt")["data"]["n"] == 16

    other = tmp_path / "other_data"  # same layout and size, other content
    write_synthetic(other, "train", 16, size=64, seed=1)
    write_synthetic(other, "val", 4, size=64, seed=1)
    with pytest.raises(CheckpointError, match=r"trained on split 'train' of 16 images .* differ in: annotations_sha256"):
        train(_config(other, out, iterations=2, eval_limit=0, resume=True))
