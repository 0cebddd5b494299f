"""``diagnose``: metric per step, state-space PCA, ||h_T - h_N|| with a KS test, on tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from crbp_fast import cli
from crbp_fast.tasks.pathfinder.dataset import EVAL_INDEX_OFFSET, PathfinderDataset
from crbp_fast.tasks.pathfinder.diagnose import DiagnoseError, diagnose, load_checkpoint_model, plot_summary
from crbp_fast.tasks.pathfinder.train import CheckpointError, TrainConfig, evaluate, train

MINE = ("pathfinder", "train", "diagnose")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for algorithm in ("bptt", "crbp"):
        config = TrainConfig(
            task="segmentation", length=4, size=32, channels=4, kernel_size=3, steps=3, batch_size=4, iterations=2,
            backend="torch", conv="direct",
            eval_size=0, out=str(root / algorithm), progress=False, threads=1, algorithm=algorithm,
        )
        train(config)
        paths.append(root / algorithm / "checkpoint.pt")
    return paths


def test_diagnose_writes_plots_and_summary(checkpoints, tmp_path):
    out = tmp_path / "diag"
    summary = diagnose([str(p) for p in checkpoints], test_steps=6, out=out, n_images=8, batch_size=4, pca_images=3)
    assert sorted(p.name for p in out.iterdir()) == [
        "distances.png", "forward_trace.png", "metric_vs_step.png", "state_space.png", "summary.json",
        "training_loss.png"]
    assert json.loads((out / "summary.json").read_text()) == summary
    for entry, algorithm in zip(summary["checkpoints"], ("bptt", "crbp")):
        assert entry["algorithm"] == algorithm and entry["train_steps"] == 3 and entry["metric"] == "f1"
        assert all(len(v) == 6 for v in entry["per_step"].values())
        assert len(entry["distance"]["values"]) == 8 and min(entry["distance"]["values"]) >= 0
        assert 0 <= sum(entry["pca"]["explained_variance"]) <= 1 + 1e-9
        assert len(entry["pca"]["points"]) == 6 and len(entry["pca"]["points"][0]) == 3  # T x pca_images
        assert entry["training"]["steps"] == 2 and entry["training"]["last_eval"] is None  # eval_size=0
    (ks,) = summary["ks"]
    assert (ks["a"], ks["b"]) == ("bptt", "crbp") and 0 <= ks["pvalue"] <= 1 and 0 <= ks["statistic"] <= 1
    # The plots are drawn from the stored summary alone.
    replot = plot_summary(json.loads((out / "summary.json").read_text()), tmp_path)
    assert sorted(p.name for p in replot) == sorted(summary["plots"])


def test_metric_at_training_steps_matches_the_trainer(checkpoints, tmp_path):
    """Step-by-step diagnosis at t = N scores what the trainer's evaluation scores."""
    model, config = load_checkpoint_model(checkpoints[1])
    data = PathfinderDataset("segmentation", 4, 32, config["seed"], 8, start=EVAL_INDEX_OFFSET)
    expected = evaluate(model, data, 4, torch.device("cpu"))
    summary = diagnose([str(checkpoints[1])], test_steps=5, out=tmp_path, n_images=8, batch_size=4)
    (entry,) = summary["checkpoints"]
    for name in ("iou", "f1", "balanced_accuracy"):
        assert entry["per_step"][name][2] == pytest.approx(expected[name], abs=1e-12), name
    assert summary["ks"] == []


def test_diagnose_errors(checkpoints, tmp_path):
    ckpt = torch.load(checkpoints[0], weights_only=False)
    ckpt["config"]["kernel_size"] = 5
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"parameter 'cell\.w_gate_inh' has shape \(4, 4, 3, 3\) in the "
                                              r"checkpoint but \(4, 4, 5, 5\)"):
        diagnose([str(tmp_path / "other.pt")], test_steps=4, out=tmp_path)
    with pytest.raises(DiagnoseError, match="train_steps: expected 1 <= N < test_steps=3, got N=3"):
        diagnose([str(checkpoints[0])], test_steps=3, out=tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        diagnose([str(tmp_path / "missing.pt")], test_steps=4, out=tmp_path)


def test_cli_diagnose(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", [c for c in cli.COMMANDS if c[0] in MINE])
    code = cli.main(["diagnose", *map(str, checkpoints), "--train-steps", "2", "--test-steps", "4",
                     "--n-images", "4", "--batch-size", "4", "--out", str(tmp_path / "d"), "--labels", "a", "b"])
    assert code == 0
    out = capsys.readouterr().out
    assert "a: f1" in out and "KS a vs b" in out
    code = cli.main(["diagnose", str(checkpoints[0]), "--test-steps", "4", "--length", "41", "--out", str(tmp_path)])
    assert code == 2 and "length: expected an int contour length in 2..40, got 41" in capsys.readouterr().err


def test_diagnose_a_published_checkpoint(tmp_path, monkeypatch, capsys):
    """A checkpoint as the published training script writes it (written here, in its layout and shapes)."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "conv0.weight": (25, 1, 7, 7), "conv0.bias": (25,), "unit1.u1_gate.weight": (25, 25, 1, 1),
        "unit1.u1_gate.bias": (25,), "unit1.u2_gate.weight": (25, 25, 1, 1), "unit1.u2_gate.bias": (25,),
        "unit1.w_gate_inh": (25, 25, 15, 15), "unit1.w_gate_exc": (25, 25, 15, 15),
        **{f"unit1.{n}": (25, 1, 1) for n in ("alpha", "gamma", "kappa", "w", "mu")},
        **{f"unit1.bn.{i}.{n}": (25,) for i in range(4) for n in ("weight", "bias")},
        "bn.weight": (25,), "bn.bias": (25,), "conv6.weight": (2, 25, 1, 1), "conv6.bias": (2,),
    }
    state = {"module." + k: 0.01 * torch.rand(s, generator=g) for k, s in shapes.items()}
    path = tmp_path / "model_fscore_9000_epoch_03_checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": state, "best_prec1": 0.9}, path)
    with pytest.raises(DiagnoseError, match="train_steps: checkpoint .* is a published checkpoint, which does not "
                                            "record it; pass --train-steps"):
        diagnose([str(path)], test_steps=3, out=tmp_path / "d", length=4)
    with pytest.raises(DiagnoseError, match="length: .* pass --length"):
        diagnose([str(path)], test_steps=3, out=tmp_path / "d", train_steps=1)
    model, config = load_checkpoint_model(path, train_steps=1, length=4)
    assert config["algorithm"] == "published" and config["size"] == 150 and config["epoch"] == 3
    assert torch.equal(model.cell.w_gate_inh, state["module.unit1.w_gate_inh"])
    monkeypatch.setattr(cli, "COMMANDS", [c for c in cli.COMMANDS if c[0] in MINE])
    code = cli.main(["diagnose", str(path), "--train-steps", "1", "--length", "4", "--test-steps", "2",
                     "--n-images", "2", "--batch-size", "2", "--pca-images", "2", "--out", str(tmp_path / "d")])
    assert code == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    entry = summary["checkpoints"][0]
    assert entry["algorithm"] == "published" and entry["train_steps"] == 1 and len(entry["per_step"]["f1"]) == 2
