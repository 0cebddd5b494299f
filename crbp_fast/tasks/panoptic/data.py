"""COCO-panoptic data: a synthetic dataset writer and the reader (synthetic or real COCO on disk).

The COCO panoptic format (https://cocodataset.org/#format-data, "Panoptic Segmentation"):

    <root>/<split>/<file_name>                        the images (COCO: .jpg; synthetic: .png)
    <root>/annotations/panoptic_<split>.json          images, annotations, categories
    <root>/annotations/panoptic_<split>/<png name>    one RGB PNG per image: segment id = R + 256 G + 256^2 B
                                                      (0 = unlabeled)

The JSON: ``images`` [{id, file_name, height, width}], ``annotations`` [{image_id, file_name,
segments_info: [{id, category_id, area, bbox (x, y, w, h), iscrowd}]}], ``categories`` [{id,
name, isthing, color}]. For real COCO 2017 panoptic, unpack ``train2017/``, ``val2017/`` and
``annotations/panoptic_{train,val}2017.json`` with their PNG folders under one root and pass
``split="val2017"`` (nothing is downloaded here).

Reading: :class:`CocoPanoptic` is a ``torchvision.datasets.VisionDataset`` whose index is a
``pycocotools.coco.COCO`` (one annotation per segment); segment ids come from the PNGs with
:func:`rgb_to_id` (panopticapi's ``rgb2id``); :meth:`CocoPanoptic.instances` converts the thing
segments to a COCO instance index with RLE masks (``pycocotools.mask``), as panopticapi's
``panoptic2detection_coco_format`` does, for ``COCOeval``.

Label conventions of :class:`CocoPanoptic` (as in Panoptic FPN): thing categories become Mask R-CNN
labels 1..T (0 is background); the semantic target has 0 for "a thing", 1..S for the stuff
categories and ``IGNORE`` for unlabeled and crowd pixels; the panoptic target is (category_id,
instance id) per pixel with category ``VOID`` (0; COCO ids start at 1) where unlabeled or crowd.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets import VisionDataset
from torchvision.ops import masks_to_boxes

IGNORE = 255
VOID = 0
#: Segments smaller than this many pixels are not written (an instance hidden behind others).
MIN_SEGMENT_AREA = 12

#: The synthetic categories: (id, name, isthing, mean RGB). Things have class-specific colours and
#: shapes; stuff fills the background in two textured regions.
SYNTHETIC_CATEGORIES = (
    (1, "square", 1, (220, 60, 50)),
    (2, "disc", 1, (60, 200, 70)),
    (3, "triangle", 1, (240, 220, 60)),
    (4, "sky", 0, (70, 110, 210)),
    (5, "ground", 0, (130, 90, 50)),
)


class PanopticDataError(ValueError):
    """A dataset folder or file that does not follow the COCO panoptic format (names the file)."""


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic segment ids of an (H, W, 3) uint8 PNG: R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_id`: (H, W) int -> (H, W, 3) uint8."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


@dataclass(frozen=True)
class PanopticPaths:
    """Where one split of a COCO-panoptic root lives."""

    images: Path
    annotations: Path
    segments: Path

    @classmethod
    def of(cls, root: str | Path, split: str) -> "PanopticPaths":
        root = Path(root)
        return cls(root / split, root / "annotations" / f"panoptic_{split}.json",
                   root / "annotations" / f"panoptic_{split}")


# --- the synthetic writer -------------------------------------------------------------------------


def _draw_sample(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, np.ndarray, list]:
    """One image, its segment-id map and [(segment id, category id)]."""
    yy, xx = np.mgrid[0:size, 0:size]
    cats = {c[0]: c for c in SYNTHETIC_CATEGORIES}
    ids = np.zeros((size, size), np.int64)
    image = np.zeros((size, size, 3), np.float64)
    # Stuff: sky above a wavy horizon, ground below.
    horizon = size * rng.uniform(0.3, 0.7) + size * 0.08 * np.sin(xx / size * rng.uniform(2, 7) + rng.uniform(0, 6))
    segments = []
    for seg_id, (cat, region) in enumerate(((4, yy < horizon), (5, yy >= horizon)), start=1):
        ids[region] = seg_id
        image[region] = cats[cat][3]
        segments.append((seg_id, cat))
    # Things: drawn in order, later ones on top.
    for k in range(int(rng.integers(1, max_objects + 1))):
        cat = int(rng.integers(1, 4))
        r = rng.uniform(0.08, 0.17) * size
        cy, cx = rng.uniform(r, size - r, 2)
        if cat == 1:
            mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
        elif cat == 2:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:  # upward triangle inside the circle of radius r
            mask = (yy <= cy + r * 0.8) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)
        seg_id = len(segments) + 1
        ids[mask] = seg_id
        image[mask] = cats[cat][3]
        segments.append((seg_id, cat))
    image += rng.normal(0, 18, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, ids, segments


def write_synthetic(root: str | Path, split: str, n: int, size: int = 64, seed: int = 0,
                    max_objects: int = 4) -> PanopticPaths:
    """Write ``n`` synthetic images of ``split`` under ``root`` in the COCO panoptic format.

    Each image: a sky / ground background (two stuff classes) and 1..``max_objects`` things
    (squares, discs, triangles; each class its own colour, noisy). Deterministic in
    (``seed``, ``split``, index). Segments hidden below ``MIN_SEGMENT_AREA`` pixels are dropped
    (their pixels become unlabeled).

    Returns:
        The :class:`PanopticPaths` of the split.
    """
    for name, value, low in (("n", n, 1), ("size", size, 16), ("max_objects", max_objects, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    paths = PanopticPaths.of(root, split)
    paths.images.mkdir(parents=True, exist_ok=True)
    paths.segments.mkdir(parents=True, exist_ok=True)
    split_key = sum(split.encode())  # a different stream per split with the same seed
    images, annotations = [], []
    for index in range(n):
        rng = np.random.default_rng([seed, split_key, index])
        image, ids, segments = _draw_sample(rng, size, max_objects)
        info = []
        for seg_id, cat in segments:
            mask = ids == seg_id
            area = int(mask.sum())
            if area < MIN_SEGMENT_AREA:
                ids[mask] = 0
                continue
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            info.append({"id": seg_id, "category_id": cat, "area": area, "bbox": bbox, "iscrowd": 0})
        name = f"{index:012d}.png"
        Image.fromarray(image).save(paths.images / name)
        Image.fromarray(id_to_rgb(ids)).save(paths.segments / name)
        images.append({"id": index, "file_name": name, "height": size, "width": size})
        annotations.append({"image_id": index, "file_name": name, "segments_info": info})
    categories = [{"id": i, "name": nm, "isthing": t, "color": list(c)} for i, nm, t, c in SYNTHETIC_CATEGORIES]
    doc = {"info": {"description": f"crbp_fast synthetic panoptic, seed {seed}, size {size}"},
           "images": images, "annotations": annotations, "categories": categories}
    tmp = paths.annotations.with_name(paths.annotations.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(paths.annotations)  # the JSON last and atomically: its presence means the split is complete
    return paths


# --- the reader -----------------------------------------------------------------------------------


class CocoPanoptic(VisionDataset):
    """A COCO-panoptic split as ``(image, target)`` for :class:`~crbp_fast.tasks.panoptic.model.PanopticFPN`.

    A :class:`torchvision.datasets.VisionDataset` (``transforms(image, target)`` as in
    ``torchvision.datasets.CocoDetection``) whose annotation index is a ``pycocotools.coco.COCO``
    (``self.coco``): its images and categories as in the file, and one COCO annotation per
    segment of ``segments_info`` (``id`` unique in the split, ``segment_id`` the id in the PNG,
    ``category_id``, ``bbox``, ``area``, ``iscrowd``), so ``coco.getAnnIds(imgIds=..., catIds=...,
    iscrowd=...)``, ``coco.catToImgs`` and the rest work on it. :meth:`instances` gives the thing
    segments as a COCO *instance* index with RLE masks (for ``COCOeval`` of the detector).

    Args:
        root: the dataset root (see the module docstring for the layout).
        split: the split name (``"train"``, ``"val"``, ``"val2017"``, ...).
        limit: read only the first ``limit`` images by id (None: all).
        transforms: optional ``(image, target) -> (image, target)``, applied last.

    Each item: ``image`` float (3, H, W) in [0, 1]; ``target`` with ``boxes`` (N, 4) xyxy,
    ``labels`` (N,) in 1..T, ``masks`` (N, H, W) uint8 for the non-crowd thing segments,
    ``semantic`` (H, W) int64 (0 things, 1..S stuff, ``IGNORE``), ``panoptic`` (H, W, 2) int64
    (category id, segment id; ``VOID`` category where unlabeled or crowd) and ``image_id``.
    """

    def __init__(self, root: str | Path, split: str, limit: int | None = None,
                 transforms: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None):
        super().__init__(str(root), transforms=transforms)
        self.paths = PanopticPaths.of(root, split)
        if not self.paths.annotations.is_file():
            raise PanopticDataError(
                f"root / split: no {self.paths.annotations} (expected the COCO panoptic layout "
                f"<root>/annotations/panoptic_<split>.json; write a synthetic one with "
                f"`crbp-fast panoptic generate`)"
            )
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit: expected an int >= 1 or None, got {limit!r}")
        raw = self.paths.annotations.read_bytes()
        try:
            doc = json.loads(raw)
            self.coco, self._png = _segment_index(doc)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise PanopticDataError(f"{self.paths.annotations}: not a COCO panoptic annotation file ({err!r})") from None
        missing = [i for i in self.coco.imgs if i not in self._png]
        if missing:
            raise PanopticDataError(f"{self.paths.annotations}: image {missing[0]} "
                                    f"({self.coco.imgs[missing[0]]['file_name']}) has no entry in 'annotations'")
        unknown = [a for a in self.coco.anns.values() if a["category_id"] not in self.coco.cats]
        if unknown:
            raise PanopticDataError(f"{self.paths.annotations}: image {unknown[0]['image_id']}: segment "
                                    f"{unknown[0]['segment_id']} has category_id {unknown[0]['category_id']}, "
                                    f"which is not in 'categories'")
        self.ids = sorted(self.coco.imgs)[:limit]
        if not self.ids:
            raise PanopticDataError(f"{self.paths.annotations}: no images")
        self.split, self.limit = split, limit
        self.annotations_sha256 = hashlib.sha256(raw).hexdigest()
        self.categories = [self.coco.cats[c] for c in sorted(self.coco.cats)]
        self.things = [c["id"] for c in self.categories if c["isthing"]]
        self.stuffs = [c["id"] for c in self.categories if not c["isthing"]]
        self.thing_label = {cid: i + 1 for i, cid in enumerate(self.things)}
        self.stuff_label = {cid: i + 1 for i, cid in enumerate(self.stuffs)}

    def fingerprint(self) -> dict:
        """What this split is, recorded in checkpoints and compared on resume: the split, the
        number of images and the SHA-256 of the annotation file (image files are not hashed: the
        segment ids and file names of every image are in the annotations)."""
        return {"source": "coco-panoptic", "split": self.split, "n": len(self.ids), "limit": self.limit,
                "annotations_sha256": self.annotations_sha256}

    @property
    def num_things(self) -> int:
        return len(self.things)

    @property
    def num_stuff(self) -> int:
        return len(self.stuffs)

    def __len__(self) -> int:
        return len(self.ids)

    def _file(self, path: Path, image_id: int) -> Path:
        if not path.is_file():
            raise PanopticDataError(f"{self.paths.annotations}: image {image_id} names {path}, which is missing")
        return path

    def segment_ids(self, image_id: int) -> np.ndarray:
        """The (H, W) int64 segment ids of an image, from its PNG (0 = unlabeled)."""
        path = self._file(self.paths.segments / self._png[image_id], image_id)
        ids = rgb_to_id(np.asarray(Image.open(path).convert("RGB")))
        meta = self.coco.imgs[image_id]
        if ids.shape != (meta["height"], meta["width"]):
            raise PanopticDataError(f"{path}: shape {ids.shape} differs from the image's {meta['height']} x "
                                    f"{meta['width']} in {self.paths.annotations.name}")
        return ids

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.ids[index]
        meta = self.coco.imgs[image_id]
        image_path = self._file(self.paths.images / meta["file_name"], image_id)
        image = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1).float() / 255
        ids = torch.from_numpy(self.segment_ids(image_id))
        if ids.shape != image.shape[1:]:
            raise PanopticDataError(f"{image_path}: shape {tuple(image.shape[1:])} differs from its "
                                    f"segments' {tuple(ids.shape)}")
        semantic = torch.full(ids.shape, IGNORE, dtype=torch.int64)
        panoptic = torch.zeros(*ids.shape, 2, dtype=torch.int64)  # VOID category, segment 0
        masks, labels = [], []
        for seg in self.coco.imgToAnns[image_id]:
            mask = ids == seg["segment_id"]
            cat = seg["category_id"]
            if seg["iscrowd"] or not mask.any():
                continue  # crowd regions stay void / ignored, as in Panoptic FPN training
            panoptic[mask] = torch.tensor([cat, seg["segment_id"]])
            if cat in self.thing_label:
                semantic[mask] = 0
                masks.append(mask)
                labels.append(self.thing_label[cat])
            else:
                semantic[mask] = self.stuff_label[cat]
        h, w = ids.shape
        masks_t = torch.stack(masks).to(torch.uint8) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        boxes = masks_to_boxes(masks_t) if masks else torch.zeros(0, 4)
        # masks_to_boxes gives inclusive pixel coordinates; a one-pixel-wide box would be empty.
        boxes[:, 2:] += 1
        target = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks_t,
                  "semantic": semantic, "panoptic": panoptic, "image_id": int(image_id)}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def instances(self):
        """The thing segments of these images as a ``pycocotools.coco.COCO`` instance index.

        One annotation per thing segment (crowd ones with ``iscrowd`` 1), its mask as RLE
        (``pycocotools.mask.encode`` of the PNG's segment), ``area`` and ``bbox`` from that RLE,
        ``id`` / ``category_id`` as in :attr:`coco`; the thing categories only. This is what
        panopticapi's ``panoptic2detection_coco_format`` converter writes, so ``COCOeval`` (bbox
        or segm) scores the detector's instances against it. Reads every image's PNG.
        """
        from pycocotools import mask as mask_utils

        annotations = []
        for image_id in self.ids:
            ids = self.segment_ids(image_id)
            for seg in self.coco.imgToAnns[image_id]:
                if seg["category_id"] not in self.thing_label:
                    continue
                rle = mask_utils.encode(np.asfortranarray(ids == seg["segment_id"], dtype=np.uint8))
                annotations.append({
                    "id": seg["id"], "image_id": image_id, "category_id": seg["category_id"],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": int(seg["iscrowd"]),
                })
        return _coco({"images": [self.coco.imgs[i] for i in self.ids], "annotations": annotations,
                      "categories": [c for c in self.categories if c["isthing"]]})


def _coco(dataset: dict):
    """A ``pycocotools.coco.COCO`` over an in-memory dataset dict (its index messages silenced)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _segment_index(doc: dict):
    """The COCO index of a panoptic file (one annotation per segment) and each image's PNG name."""
    annotations, png = [], {}
    for entry in doc["annotations"]:
        png[entry["image_id"]] = entry["file_name"]
        for seg in entry["segments_info"]:
            annotations.append({"id": len(annotations) + 1, "image_id": entry["image_id"], "segment_id": seg["id"],
                                "category_id": seg["category_id"], "bbox": seg.get("bbox"),
                                "area": seg.get("area"), "iscrowd": int(seg.get("iscrowd", 0))})
    return _coco({"images": doc["images"], "annotations": annotations, "categories": doc["categories"]}), png


def collate(batch: list) -> tuple[list[Tensor], list[dict]]:
    """Detection-style collate: lists of images and targets (sizes may differ)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


__all__ = ["CocoPanoptic", "IGNORE", "PanopticDataError", "PanopticPaths", "SYNTHETIC_CATEGORIES", "VOID",
           "collate", "id_to_rgb", "rgb_to_id", "write_synthetic"]
