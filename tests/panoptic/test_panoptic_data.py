"""The synthetic COCO-panoptic writer and the reader: the format round-trips and is self-consistent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from crbp_fast.tasks.panoptic.data import (
    IGNORE, VOID, CocoPanoptic, PanopticDataError, PanopticPaths, id_to_rgb, rgb_to_id, write_synthetic,
)


def test_segment_id_encoding_round_trips():
    ids = np.array([[0, 1, 255], [256, 65535, 65536 * 3 + 7]])
    assert (rgb_to_id(id_to_rgb(ids)) == ids).all()


def test_written_json_matches_the_pngs(panoptic_root):
    paths = PanopticPaths.of(panoptic_root, "train")
    doc = json.loads(paths.annotations.read_text())
    assert {c["name"]: c["isthing"] for c in doc["categories"]} == {
        "square": 1, "disc": 1, "triangle": 1, "sky": 0, "ground": 0}
    assert len(doc["images"]) == len(doc["annotations"]) == 16
    for ann in doc["annotations"][:4]:
        ids = rgb_to_id(np.asarray(Image.open(paths.segments / ann["file_name"])))
        assert {s["id"] for s in ann["segments_info"]} == set(np.unique(ids).tolist()) - {0}
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            assert seg["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_writer_is_deterministic(tmp_path, panoptic_root):
    write_synthetic(tmp_path, "train", 2, size=64, seed=0)
    for name in ("000000000000.png", "000000000001.png"):
        a = np.asarray(Image.open(tmp_path / "train" / name))
        b = np.asarray(Image.open(panoptic_root / "train" / name))
        assert (a == b).all()


def test_reader_targets(panoptic_root):
    ds = CocoPanoptic(panoptic_root, "train")
    assert (ds.things, ds.stuffs) == ([1, 2, 3], [4, 5])
    image, target = ds[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    n = len(target["labels"])
    assert n >= 1 and target["masks"].shape == (n, 64, 64) and target["boxes"].shape == (n, 4)
    assert set(target["labels"].tolist()) <= {1, 2, 3}
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert (target["semantic"][mask.bool()] == 0).all()  # things are class 0 of the semantic head
    assert set(target["semantic"].unique().tolist()) <= {0, 1, 2, IGNORE}
    pan = target["panoptic"]
    assert pan.shape == (64, 64, 2)
    assert set(pan[..., 0].unique().tolist()) <= {VOID, 1, 2, 3, 4, 5}
    assert ((pan[..., 0] == VOID) == (target["semantic"] == IGNORE)).all()


def test_missing_annotations_name_the_file(tmp_path):
    with pytest.raises(PanopticDataError, match="panoptic_val.json"):
        CocoPanoptic(tmp_path, "val")


def test_missing_png_names_the_file(tmp_path):
    paths = write_synthetic(tmp_path, "val", 2, size=32)
    (paths.segments / "000000000001.png").unlink()
    with pytest.raises(PanopticDataError, match="000000000001.png, which is missing"):
        CocoPanoptic(tmp_path, "val")[1]


def test_writer_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="size: expected an int >= 16, got 8"):
        write_synthetic(tmp_path, "train", 2, size=8)
