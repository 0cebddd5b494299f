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


def _hand_written(root) -> None:
    """A 4 x 6 COCO-panoptic split written by hand, as COCO 2017 lays it out (a .jpg image):
    a thing of category 7 (segment 258 = RGB (2, 1, 0)), a thing of category 1 (262151 = (7, 0, 4)),
    a crowd thing (592137 = (9, 9, 9)), stuff 184 (5 = (5, 0, 0)) and unlabeled pixels."""
    t7, t1, crowd, sky, none = (2, 1, 0), (7, 0, 4), (9, 9, 9), (5, 0, 0), (0, 0, 0)
    rgb = np.array([[sky, sky, sky, sky, sky, none],
                    [t7, t7, sky, t1, t1, none],
                    [t7, t7, sky, t1, t1, crowd],
                    [none, sky, sky, sky, crowd, crowd]], dtype=np.uint8)
    (root / "annotations" / "panoptic_tiny2017").mkdir(parents=True)
    (root / "tiny2017").mkdir()
    Image.fromarray(rgb).save(root / "annotations" / "panoptic_tiny2017" / "000000000042.png")
    Image.fromarray(np.full((4, 6, 3), 128, np.uint8)).save(root / "tiny2017" / "000000000042.jpg")
    doc = {
        "images": [{"id": 42, "file_name": "000000000042.jpg", "height": 4, "width": 6}],
        "annotations": [{"image_id": 42, "file_name": "000000000042.png", "segments_info": [
            {"id": 258, "category_id": 7, "area": 4, "bbox": [0, 1, 2, 2], "iscrowd": 0},
            {"id": 262151, "category_id": 1, "area": 4, "bbox": [3, 1, 2, 2], "iscrowd": 0},
            {"id": 592137, "category_id": 1, "area": 3, "bbox": [4, 2, 2, 2], "iscrowd": 1},
            {"id": 5, "category_id": 184, "area": 10, "bbox": [0, 0, 5, 4], "iscrowd": 0}]}],
        "categories": [{"id": 184, "name": "sky-other-merged", "isthing": 0, "color": [70, 130, 180]},
                       {"id": 7, "name": "train", "isthing": 1, "color": [0, 80, 100]},
                       {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]}],
    }
    (root / "annotations" / "panoptic_tiny2017.json").write_text(json.dumps(doc))


def test_reader_on_a_hand_written_coco_panoptic_split(tmp_path):
    _hand_written(tmp_path)
    ds = CocoPanoptic(tmp_path, "tiny2017")
    assert (ds.things, ds.stuffs, len(ds)) == ([1, 7], [184], 1)
    # The pycocotools index: one annotation per segment, crowd flagged.
    assert len(ds.coco.getAnnIds(imgIds=[42])) == 4 and len(ds.coco.getAnnIds(imgIds=[42], iscrowd=False)) == 3
    assert ds.coco.catToImgs[184] == [42]
    image, target = ds[0]
    assert image.shape == (3, 4, 6) and target["image_id"] == 42
    assert target["labels"].tolist() == [2, 1]  # category 7 -> label 2, category 1 -> label 1 (sorted ids)
    assert target["boxes"].tolist() == [[0, 1, 2, 3], [3, 1, 5, 3]]
    assert target["masks"][0].tolist() == [[0] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0] * 6]
    I = IGNORE  # noqa: E741
    assert target["semantic"].tolist() == [[1, 1, 1, 1, 1, I], [0, 0, 1, 0, 0, I], [0, 0, 1, 0, 0, I],
                                           [I, 1, 1, 1, I, I]]
    assert target["panoptic"][1, 0].tolist() == [7, 258] and target["panoptic"][1, 3].tolist() == [1, 262151]
    assert target["panoptic"][3, 5].tolist() == [VOID, 0] and target["panoptic"][0, 5].tolist() == [VOID, 0]
    # The instance index: thing segments as RLE, crowd kept as crowd; its masks are the PNG's.
    inst = ds.instances()
    assert sorted(inst.cats) == [1, 7]
    anns = inst.loadAnns(inst.getAnnIds(imgIds=[42]))
    assert [(a["category_id"], a["iscrowd"], a["area"], a["bbox"]) for a in anns] == [
        (7, 0, 4.0, [0.0, 1.0, 2.0, 2.0]), (1, 0, 4.0, [3.0, 1.0, 2.0, 2.0]), (1, 1, 3.0, [4.0, 2.0, 2.0, 2.0])]
    assert (inst.annToMask(anns[0]) == target["masks"][0].numpy()).all()
    # torchvision-style joint transforms run last.
    flipped = CocoPanoptic(tmp_path, "tiny2017", transforms=lambda im, t: (im.flip(-1), {**t, "flipped": True}))
    assert flipped[0][1]["flipped"] and torch.equal(flipped[0][0], image.flip(-1))


def test_instances_of_the_synthetic_set_match_the_targets_and_score_ap_1(panoptic_root):
    from pycocotools.cocoeval import COCOeval

    ds = CocoPanoptic(panoptic_root, "val")
    inst = ds.instances()
    for index in range(len(ds)):
        _, target = ds[index]
        anns = inst.loadAnns(inst.getAnnIds(imgIds=[target["image_id"]]))
        assert len(anns) == len(target["labels"])
        for ann, mask, box, label in zip(anns, target["masks"], target["boxes"], target["labels"]):
            assert (inst.annToMask(ann) == mask.numpy()).all()
            x, y, w, h = ann["bbox"]
            assert [x, y, x + w, y + h] == box.tolist() and ds.things[int(label) - 1] == ann["category_id"]
    # COCOeval takes the index as ground truth: the ground truth as detections scores AP 1.
    detections = inst.loadRes([{**a, "score": 1.0} for a in inst.dataset["annotations"]])
    evaluation = COCOeval(inst, detections, "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_annotation_errors_name_the_file_and_the_entry(tmp_path):
    _hand_written(tmp_path)
    path = tmp_path / "annotations" / "panoptic_tiny2017.json"
    doc = json.loads(path.read_text())
    doc["annotations"][0]["segments_info"][0]["category_id"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(PanopticDataError, match=r"panoptic_tiny2017.json: image 42: segment 258 has category_id 99, "
                                                r"which is not in 'categories'"):
        CocoPanoptic(tmp_path, "tiny2017")
    doc["annotations"] = []
    path.write_text(json.dumps(doc))
    with pytest.raises(PanopticDataError, match=r"image 42 \(000000000042.jpg\) has no entry in 'annotations'"):
        CocoPanoptic(tmp_path, "tiny2017")
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(PanopticDataError, match="not a COCO panoptic annotation file"):
        CocoPanoptic(tmp_path, "tiny2017")
