"""The Pathfinder trainer: every algorithm runs, exact resume after an interruption, bad input is named."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pytest
import torch

from crbp_fast import cli
from crbp_fast.tasks.pathfinder import dataset as pds
from crbp_fast.tasks.runs import StepBatches
from crbp_fast.tasks.pathfinder.train import (
    CheckpointError, ConfigError, Interrupted, TrainConfig, build_model, load_model_state,
    read_checkpoint, train,
)

MINE = ("pathfinder", "train", "diagnose")


def tiny(tmp_path, **kw) -> TrainConfig:
    """A run of a few seconds: 32 x 32 images, C = 4, k = 3, N = 3, one CPU thread, the reference backend."""
    base = dict(task="segmentation", length=4, size=32, channels=4, kernel_size=3, steps=3, batch_size=4,
                backend="torch", conv="direct",
                iterations=2, eval_size=8, out=str(tmp_path / "run"), progress=False, threads=1, checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["bptt", "cbptt", "rbp", "crbp"])
def test_smoke_every_algorithm(tmp_path, algorithm):
    result = train(tiny(tmp_path, algorithm=algorithm))
    assert result.step == 2 and len(result.losses) == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert set(result.metrics) == {"iou", "f1", "balanced_accuracy", "accuracy", "loss"}
    records = read_log(result.out)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    first = train_records[0]
    assert first["forward_residual"] >= 0 and first["seconds"] > 0
    assert (first["penalty"] is not None) == (algorithm in ("cbptt", "crbp"))
    assert (first["adjoint_iterations"] is not None) == (algorithm in ("rbp", "crbp"))
    assert records[-1]["kind"] == "eval" and records[-1]["step"] == 2
    ckpt = read_checkpoint(result.out / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["algorithm"] == algorithm
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    assert "state" in ckpt["optimizer"] and ckpt["optimizer"]["state"]


def test_smoke_classification_from_shards(tmp_path):
    pds.write_shards(tmp_path / "d", 8, "classification", 4, 32, seed=5, shard_size=4, progress=False)
    config = tiny(tmp_path, task="classification", seed=5, data=str(tmp_path / "d"), iterations=None, epochs=2,
                  algorithm="crbp")
    result = train(config)
    assert result.step == 4  # 2 epochs of 8 images in batches of 4
    assert 0.0 <= result.metrics["balanced_accuracy"] <= 1.0


def test_interrupted_run_resumes_exactly(tmp_path):
    """Stopped by SIGINT after step 3, resumed to step 6: same losses and weights as one run."""
    whole = train(tiny(tmp_path, iterations=6, out=str(tmp_path / "whole"), algorithm="crbp"))

    def interrupt(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    part = tiny(tmp_path, iterations=6, out=str(tmp_path / "part"), algorithm="crbp")
    with pytest.raises(Interrupted) as stop:
        train(part, after_step=interrupt)
    assert stop.value.step == 3
    assert read_checkpoint(tmp_path / "part" / "checkpoint.pt")["step"] == 3  # no finished step lost
    resumed = train(replace(part, resume=True))
    assert resumed.step == 6
    losses = {r["step"]: r["loss"] for r in read_log(tmp_path / "part") if r["kind"] == "train"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert [losses[s] for s in range(1, 7)] == whole.losses  # bitwise: same floats
    a = read_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = read_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    # Running it again has nothing left to do and keeps the log as it is.
    again = train(replace(part, resume=True))
    assert again.step == 6 and again.losses == []
    assert len([r for r in read_log(tmp_path / "part") if r["kind"] == "train"]) == 6


def test_step_batches_shard_the_global_batch():
    for n in (None, 10):
        ranks = [list(StepBatches(0, 4, 2, r, 2, n, seed=1)) for r in range(2)]
        whole = list(StepBatches(0, 4, 4, 0, 1, n, seed=1))
        for step in range(4):
            assert sorted(ranks[0][step] + ranks[1][step]) == sorted(whole[step])
            assert set(ranks[0][step]).isdisjoint(ranks[1][step])
    epoch = [i for batch in StepBatches(0, 2, 4, 0, 1, 8, seed=0) for i in batch]
    assert sorted(epoch) == list(range(8))  # one epoch of 8 visits every image once


@pytest.mark.parametrize(
    "change, match",
    [
        ({"task": "detection"}, "task: expected one of"),
        ({"length": 41}, "length: expected an int contour length in 2..40, got 41"),
        ({"algorithm": "sgd"}, "algorithm: expected one of"),
        ({"iterations": None}, "iterations / epochs: give exactly one"),
        ({"iterations": None, "epochs": 1}, "epochs: needs a finite training set"),
        ({"train_size": 3}, "batch_size: a global batch of 4"),
    ],
    ids=["task", "length", "algorithm", "no-length", "epochs-unbounded", "batch-too-large"],
)
def test_bad_config_is_named(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        train(tiny(tmp_path, **change))


def test_checkpoint_of_another_shape_names_the_parameter(tmp_path):
    train(tiny(tmp_path))
    with pytest.raises(CheckpointError, match=r"parameter 'cell\.w_gate_inh' has shape \(4, 4, 3, 3\) in the "
                                              r"checkpoint but \(6, 6, 3, 3\) in the model"):
        train(tiny(tmp_path, channels=6, iterations=3, resume=True))
    with pytest.raises(CheckpointError, match="exists; pass --resume"):
        train(tiny(tmp_path))
    with pytest.raises(CheckpointError, match="--lr is 0.01 but the checkpoint was trained with 0.001"):
        train(tiny(tmp_path, lr=0.01, iterations=3, resume=True))
    model = build_model(tiny(tmp_path, task="classification"))
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    with pytest.raises(CheckpointError, match=r"parameter 'readout\.weight' has shape"):
        load_model_state(model, state, "ckpt")


def test_data_directory_errors(tmp_path):
    pds.write_shards(tmp_path / "d", 8, "segmentation", 4, 32, seed=0, shard_size=4, progress=False)
    with pytest.raises(ConfigError, match="length: 5 was asked for but the data in .* has length 4"):
        train(tiny(tmp_path, length=5, data=str(tmp_path / "d")))
    (tmp_path / "d" / "shard_00001.images.npy").unlink()
    with pytest.raises(pds.ShardError, match="shard_00001.images.npy"):
        train(tiny(tmp_path, data=str(tmp_path / "d")))


def test_cli_train_and_its_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", [c for c in cli.COMMANDS if c[0] in MINE])
    out = tmp_path / "cli"
    args = ["train", "--length", "4", "--size", "32", "--channels", "4", "--kernel-size", "3", "--steps", "2",
            "--backend", "torch", "--conv", "direct",
            "--batch-size", "2", "--iterations", "1", "--eval-size", "2", "--threads", "1", "--no-progress",
            "--out", str(out)]
    assert cli.main(args) == 0
    assert "step 1: loss" in capsys.readouterr().out
    assert cli.main(args) == 2
    assert "checkpoint.pt exists; pass --resume" in capsys.readouterr().err
    assert cli.main(args + ["--resume", "--channels", "5"]) == 2
    err = capsys.readouterr().err
    assert "parameter 'cell.w_gate_inh' has shape (4, 4, 3, 3)" in err and err.count("\n") == 1
    assert cli.main(args[:-1] + [str(tmp_path / "other"), "--length", "99"]) == 2
    assert "length: expected an int contour length in 2..40, got 99" in capsys.readouterr().err
    assert cli.main(args[:-1] + [str(tmp_path / "other"), "--data", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_adjoint_rule_and_focal_variant_reach_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", [c for c in cli.COMMANDS if c[0] in MINE])
    out = tmp_path / "pub"
    args = ["train", "--length", "4", "--size", "32", "--channels", "4", "--kernel-size", "3", "--steps", "3",
            "--backend", "torch", "--conv", "direct", "--batch-size", "2", "--iterations", "2", "--eval-size", "0",
            "--threads", "1", "--no-progress", "--algorithm", "crbp", "--adjoint-rule", "published",
            "--focal-variant", "differentiable", "--out", str(out)]
    assert cli.main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["adjoint_rule"] == "published" and config["adjoint_solver"] == "neumann"
    assert config["focal_variant"] == "differentiable" and config["conv0_bank"] == "published"
    assert read_checkpoint(out / "checkpoint.pt")["config"]["adjoint_rule"] == "published"
    records = [r for r in read_log(out) if r["kind"] == "train"]
    assert len(records) == 2
    for r in records:  # every logged step says how the adjoint ran and why it stopped
        assert r["adjoint_stop"] in ("published", "max_steps") and 1 <= r["adjoint_iterations"] <= 15
    model = build_model(config)
    assert model.adjoint_rule == "published" and model.config["adjoint_rule"] == "published"
    capsys.readouterr()
    assert cli.main(args[:-1] + [str(tmp_path / "x"), "--adjoint-solver", "anderson"]) == 2
    assert "adjoint_rule: 'published' applies to adjoint_solver 'neumann'" in capsys.readouterr().err
    assert cli.main(args[:-1] + [str(tmp_path / "x"), "--focal-variant", "textbook"]) == 2
    assert "focal_variant: expected one of ('published', 'differentiable'), got 'textbook'" in capsys.readouterr().err


def test_checkpoint_from_before_the_published_options_keeps_its_behaviour(tmp_path):
    """A config without the new fields means what the code did then: differentiable focal loss, old init."""
    train(tiny(tmp_path))
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    for name in ("adjoint_rule", "adjoint_solver", "focal_variant", "conv0_bank", "readout_init"):
        del ckpt["config"][name]
    torch.save(ckpt, path)
    model = build_model(ckpt["config"])
    assert model.adjoint_rule == "relative" and model.config["conv0_bank"] == "zero_mean"
    with pytest.raises(CheckpointError, match="--focal-variant is 'published' but the checkpoint was trained with "
                                              "'differentiable'"):
        train(tiny(tmp_path, iterations=3, resume=True))
    result = train(tiny(tmp_path, iterations=3, resume=True, focal_variant="differentiable"))
    assert result.step == 3
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["conv0_bank"] == "zero_mean" and config["readout_init"] == "torch"  # how it was initialised
