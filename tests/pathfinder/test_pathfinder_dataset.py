"""Pathfinder datasets: on-disk shards round-trip, missing / corrupt shards are named, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crbp_fast import cli
from crbp_fast.tasks.pathfinder import dataset as pds
from crbp_fast.tasks.pathfinder import generator as pf

MINE = ("pathfinder", "train", "diagnose")


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """``crbp-fast ...`` with only this feature's subcommands registered; returns (code, stdout, stderr)."""
    monkeypatch.setattr(cli, "COMMANDS", [c for c in cli.COMMANDS if c[0] in MINE])

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def shard_dir(tmp_path):
    root = tmp_path / "pf"
    pds.write_shards(root, 7, "segmentation", 4, 32, seed=3, shard_size=3, progress=False)
    return root


def test_shards_round_trip(shard_dir):
    ds = pds.ShardedPathfinder(shard_dir)
    assert (ds.task, ds.length, ds.size, ds.seed, len(ds)) == ("segmentation", 4, 32, 3, 7)
    ds.verify()
    images, masks = pf.generate(7, "segmentation", 4, 32, seed=3)
    on_the_fly = pds.PathfinderDataset("segmentation", 4, 32, seed=3, n=7)
    for i in range(7):
        raw_image, raw_mask = ds.raw(i)
        np.testing.assert_array_equal(raw_image, images[i])
        np.testing.assert_array_equal(raw_mask, masks[i])
        image, mask = ds[i]
        assert image.dtype == torch.float32 and image.shape == (1, 32, 32) and float(image.max()) <= 1.0
        assert mask.dtype == torch.int64 and mask.shape == (32, 32)
        fly_image, fly_mask = on_the_fly[i]
        assert torch.equal(image, fly_image) and torch.equal(mask, fly_mask)


def test_classification_shards_round_trip(tmp_path):
    pds.write_shards(tmp_path / "c", 5, "classification", 4, 32, seed=1, shard_size=2, progress=False)
    ds = pds.ShardedPathfinder(tmp_path / "c")
    _, labels = pf.generate(5, "classification", 4, 32, seed=1)
    assert [int(ds[i][1]) for i in range(5)] == labels.tolist()
    assert ds[0][1].shape == ()


def test_missing_shard_is_named(shard_dir):
    (shard_dir / "shard_00001.targets.npy").unlink()
    with pytest.raises(pds.ShardError, match="missing shard files: shard_00001.targets.npy"):
        pds.ShardedPathfinder(shard_dir)


def test_corrupt_shard_is_named(shard_dir):
    path = shard_dir / "shard_00002.images.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    ds = pds.ShardedPathfinder(shard_dir)
    ds[0]  # shard 0 is intact
    with pytest.raises(pds.ShardError, match=r"shard_00002\.images\.npy is corrupt: its SHA-256"):
        ds[6]
    with pytest.raises(pds.ShardError, match=r"shard_00002\.images\.npy"):
        pds.ShardedPathfinder(shard_dir).verify()


def test_truncated_shard_and_unfinished_directory(shard_dir):
    path = shard_dir / "shard_00000.targets.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(pds.ShardError, match=r"shard_00000\.targets\.npy is corrupt: \d+ bytes"):
        pds.ShardedPathfinder(shard_dir)
    (shard_dir / "index.json").unlink()
    with pytest.raises(pds.ShardError, match="index.json is missing"):
        pds.ShardedPathfinder(shard_dir)


def test_corrupt_index(shard_dir):
    (shard_dir / "index.json").write_text("{not json")
    with pytest.raises(pds.ShardError, match="index.json is corrupt"):
        pds.ShardedPathfinder(shard_dir)


def test_write_refuses_an_existing_dataset(shard_dir):
    with pytest.raises(FileExistsError, match="already exists"):
        pds.write_shards(shard_dir, 2, "segmentation", 4, 32, progress=False)


def test_cli_generate_and_preview(tmp_path, run_cli):
    code, out, _ = run_cli("pathfinder", "generate", "--task", "classification", "--length", "4", "--size", "32",
                           "-n", "6", "--shard-size", "4", "--out", str(tmp_path / "d"), "--no-progress")
    assert code == 0 and "wrote 6 classification images" in out
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [4, 2]
    code, out, _ = run_cli("pathfinder", "preview", "--data", str(tmp_path / "d"), "-n", "4",
                           "--out", str(tmp_path / "p.png"))
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 1000
    code, _, _ = run_cli("pathfinder", "preview", "--length", "4", "--size", "32", "-n", "2",
                         "--out", str(tmp_path / "s.png"))
    assert code == 0 and (tmp_path / "s.png").exists()


def test_cli_bad_length_and_task(tmp_path, run_cli, capsys):
    code, _, err = run_cli("pathfinder", "generate", "--length", "41", "-n", "2", "--out", str(tmp_path / "x"))
    assert code == 2 and "length: expected an int contour length in 2..40, got 41" in err
    assert err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        cli.main(["pathfinder", "generate", "--task", "detection", "-n", "2", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "invalid choice: 'detection'" in capsys.readouterr().err
    code, _, err = run_cli("pathfinder", "preview", "--data", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "p.png"))
    assert code == 2 and "does not exist" in err
