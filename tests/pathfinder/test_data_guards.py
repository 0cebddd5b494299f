"""Dataset directories under faults: a malformed index.json, a shard named outside the folder,
targets of the wrong shape / values / dtype, and shards truncated or changed in place while they
are read are clear errors naming the file (never SIGBUS, never silently different data)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crbp_fast.tasks.pathfinder import dataset as pds


@pytest.fixture
def shard_dir(tmp_path):
    root = tmp_path / "pf"
    pds.write_shards(root, 6, "segmentation", 4, 32, seed=3, shard_size=3, progress=False)
    # As if generated an hour ago, so that a change now moves the modification time.
    old = time.time() - 3600
    for path in root.iterdir():
        os.utime(path, (old, old))
    return root


def edit_index(root: Path, edit) -> None:
    index = json.loads((root / "index.json").read_text())
    edit(index)
    (root / "index.json").write_text(json.dumps(index))


def replace_array(root: Path, name: str, array: np.ndarray) -> None:
    """Write ``array`` as shard file ``name`` and record its true size and checksum in index.json."""
    path = root / name
    np.save(path, array)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def edit(index):
        for entry in index["shards"]:
            for f in entry["files"].values():
                if f["name"] == name:
                    f["bytes"], f["sha256"] = path.stat().st_size, digest
    edit_index(root, edit)


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "sub/shard.npy", "..", ""],
                         ids=["dotdot", "absolute", "subdir", "parent", "empty"])
def test_shard_named_outside_the_folder_is_refused(shard_dir, name):
    edit_index(shard_dir, lambda index: index["shards"][0]["files"]["images"].update(name=name))
    with pytest.raises(pds.ShardError, match=rf"malformed: shards\[0\]\.files\.images\.name is {name!r}, "
                                             rf"expected a file name inside"):
        pds.ShardedPathfinder(shard_dir)


def test_shard_that_links_out_of_the_folder_is_refused(shard_dir, tmp_path):
    outside = tmp_path / "outside.npy"
    (shard_dir / "shard_00000.images.npy").rename(outside)
    (shard_dir / "shard_00000.images.npy").symlink_to(outside)
    with pytest.raises(pds.ShardError, match=r"shard_00000\.images\.npy' is a link out of"):
        pds.ShardedPathfinder(shard_dir)


MALFORMED = {
    "no-files": (lambda i: i["shards"][0].pop("files"), r"shards\[0\]\.files is missing, expected an object"),
    "files-list": (lambda i: i["shards"][0].update(files=["a", "b"]), r"shards\[0\]\.files is list"),
    "files-no-targets": (lambda i: i["shards"][0]["files"].pop("targets"), r"files is \['images'\], expected"),
    "shards-dict": (lambda i: i.update(shards={"0": {}}), "'shards' is dict, expected a non-empty list"),
    "shards-str": (lambda i: i.update(shards="shard_00000"), "'shards' is str, expected a non-empty list"),
    "shards-missing": (lambda i: i.pop("shards"), "'shards' is missing"),
    "shards-empty": (lambda i: i.update(shards=[]), "'shards' is list, expected a non-empty list"),
    "entry-int": (lambda i: i["shards"].__setitem__(0, 7), r"shards\[0\] is int, expected an object"),
    "count-str": (lambda i: i["shards"][0].update(count="3"), r"shards\[0\]\.count is '3', expected an int >= 1"),
    "bytes-float": (lambda i: i["shards"][0]["files"]["images"].update(bytes=1.5), r"images\.bytes is 1\.5"),
    "sha-short": (lambda i: i["shards"][0]["files"]["images"].update(sha256="abc"), r"images\.sha256 is 'abc'"),
    "n-missing": (lambda i: i.pop("n"), "'n' is missing"),
    "n-str": (lambda i: i.update(n="6"), "'n' is '6', expected an int >= 1"),
    "seed-float": (lambda i: i.update(seed=0.5), "'seed' is 0.5"),
    "config-list": (lambda i: i.update(config=[1]), "'config' is list, expected an object"),
    "config-unknown-field": (lambda i: i["config"].update(wobble=1), "wobble"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_index_is_named(shard_dir, case):
    edit, match = MALFORMED[case]
    edit_index(shard_dir, edit)
    with pytest.raises(pds.ShardError, match=r"index\.json is malformed: .*" + match):
        pds.ShardedPathfinder(shard_dir)


TARGETS = {
    "float-mask": (np.zeros((3, 1, 32, 32), np.float32), r"holds float32 \(3, 1, 32, 32\), expected uint8"),
    "mask-shape": (np.zeros((3, 32, 32), np.uint8), r"holds uint8 \(3, 32, 32\), expected uint8 \(3, 1, 32, 32\)"),
    "mask-count": (np.zeros((2, 1, 32, 32), np.uint8), r"holds uint8 \(2, 1, 32, 32\)"),
    "mask-values": (np.full((3, 1, 32, 32), 2, np.uint8), r"holds mask values in \[2, 2\], expected 0 or 1"),
    "object": (np.array([None] * 3, dtype=object), "object dtype"),
}


@pytest.mark.parametrize("case", list(TARGETS))
def test_wrong_targets_are_refused(shard_dir, case):
    array, match = TARGETS[case]
    if case == "object":
        path = shard_dir / "shard_00001.targets.npy"
        np.save(path, array, allow_pickle=True)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        edit_index(shard_dir, lambda i: i["shards"][1]["files"]["targets"].update(bytes=path.stat().st_size,
                                                                                   sha256=digest))
    else:
        replace_array(shard_dir, "shard_00001.targets.npy", array)
    ds = pds.ShardedPathfinder(shard_dir)
    ds[0]  # shard 0 is intact
    with pytest.raises(pds.ShardError, match=r"shard_00001\.targets\.npy .*" + match):
        ds[3]
    with pytest.raises(pds.ShardError, match=r"shard_00001\.targets\.npy"):
        pds.ShardedPathfinder(shard_dir).verify()


def test_classification_labels_of_the_wrong_kind_are_refused(tmp_path):
    root = tmp_path / "c"
    pds.write_shards(root, 4, "classification", 4, 32, seed=1, shard_size=2, progress=False)
    replace_array(root, "shard_00000.targets.npy", np.array([0.0, 1.0]))
    with pytest.raises(pds.ShardError, match=r"holds float64 \(2,\), expected int64 \(2,\)"):
        pds.ShardedPathfinder(root).verify()
    replace_array(root, "shard_00000.targets.npy", np.array([0, 3]))
    with pytest.raises(pds.ShardError, match=r"label values in \[0, 3\], expected 0 or 1"):
        pds.ShardedPathfinder(root).verify()


def test_bytes_changed_in_place_after_verification_are_an_error(shard_dir):
    ds = pds.ShardedPathfinder(shard_dir)
    ds.verify()
    before = ds[4][0].clone()
    path = shard_dir / "shard_00001.images.npy"
    with open(path, "r+b") as f:  # same size, other bytes: what mmap reads would train silently
        f.seek(-100, os.SEEK_END)
        f.write(b"\xff" * 100)
    with pytest.raises(pds.ShardError, match=r"shard_00001\.images\.npy changed since it was verified"):
        ds[4]
    assert before.shape == (1, 32, 32)


def test_shard_truncated_while_training_is_an_error_not_sigbus(shard_dir):
    # In a child process: under the old memory maps this read was a SIGBUS that killed pytest.
    code = f"""
import sys
from crbp_fast.tasks.pathfinder import dataset as pds
ds = pds.ShardedPathfinder({str(shard_dir)!r})
ds.verify()
ds[3]
path = ds.root / "shard_00001.images.npy"
path.write_bytes(path.read_bytes()[:200])
try:
    ds[5]
except pds.ShardError as err:
    print(err)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(pds.__file__).parents[3])})
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert "shard_00001.images.npy changed since it was verified" in proc.stdout


def test_dataloader_workers_read_verified_shards(shard_dir):
    from torch.utils.data import DataLoader

    ds = pds.ShardedPathfinder(shard_dir)
    ds.verify()
    images = [b[0] for b in DataLoader(ds, batch_size=2, num_workers=1)]
    assert sum(len(b) for b in images) == 6
    assert (images[0][0] == ds[0][0]).all()
