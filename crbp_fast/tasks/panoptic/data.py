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

Label conventions of :class:`CocoPanoptic` (as in Panoptic FPN): thing categories become Mask R-CNN
labels 1..T (0 is background); the semantic target has 0 for "a thing", 1..S for the stuff
categories and ``IGNORE`` for unlabeled and crowd pixels; the panoptic target is (category_id,
instance id) per pixel with category ``VOID`` (0; COCO ids start at 1) where unlabeled or crowd.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
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


class CocoPanoptic(Dataset):
    """A COCO-panoptic split as ``(image, target)`` for :class:`~crbp_fast.tasks.panoptic.model.PanopticFPN`.

    Args:
        root: the dataset root (see the module docstring for the layout).
        split: the split name (``"train"``, ``"val"``, ``"val2017"``, ...).
        limit: read only the first ``limit`` images (None: all).

    Each item: ``image`` float (3, H, W) in [0, 1]; ``target`` with ``boxes`` (N, 4) xyxy,
    ``labels`` (N,) in 1..T, ``masks`` (N, H, W) uint8 for the non-crowd thing segments,
    ``semantic`` (H, W) int64 (0 things, 1..S stuff, ``IGNORE``), ``panoptic`` (H, W, 2) int64
    (category id, segment id; ``VOID`` category where unlabeled or crowd) and ``image_id``.
    """

    def __init__(self, root: str | Path, split: str, limit: int | None = None):
        self.paths = PanopticPaths.of(root, split)
        if not self.paths.annotations.is_file():
            raise PanopticDataError(
                f"root / split: no {self.paths.annotations} (expected the COCO panoptic layout "
                f"<root>/annotations/panoptic_<split>.json; write a synthetic one with "
                f"`crbp-fast panoptic generate`)"
            )
        try:
            raw = self.paths.annotations.read_bytes()
            doc = json.loads(raw)
            categories = sorted(doc["categories"], key=lambda c: c["id"])
            by_image = {a["image_id"]: a for a in doc["annotations"]}
            self.images = [(im, by_image[im["id"]]) for im in sorted(doc["images"], key=lambda im: im["id"])]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PanopticDataError(f"{self.paths.annotations}: not a COCO panoptic annotation file ({err!r})") from None
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"limit: expected an int >= 1 or None, got {limit!r}")
            self.images = self.images[:limit]
        if not self.images:
            raise PanopticDataError(f"{self.paths.annotations}: no images")
        self.split, self.limit = split, limit
        self.annotations_sha256 = hashlib.sha256(raw).hexdigest()
        self.categories = categories
        self.things = [c["id"] for c in categories if c["isthing"]]
        self.stuffs = [c["id"] for c in categories if not c["isthing"]]
        self.thing_label = {cid: i + 1 for i, cid in enumerate(self.things)}
        self.stuff_label = {cid: i + 1 for i, cid in enumerate(self.stuffs)}

    def fingerprint(self) -> dict:
        """What this split is, recorded in checkpoints and compared on resume: the split, the
        number of images and the SHA-256 of the annotation file (image files are not hashed: the
        segment ids and file names of every image are in the annotations)."""
        return {"source": "coco-panoptic", "split": self.split, "n": len(self.images), "limit": self.limit,
                "annotations_sha256": self.annotations_sha256}

    @property
    def num_things(self) -> int:
        return len(self.things)

    @property
    def num_stuff(self) -> int:
        return len(self.stuffs)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        meta, ann = self.images[index]
        image_path = self.paths.images / meta["file_name"]
        seg_path = self.paths.segments / ann["file_name"]
        for path in (image_path, seg_path):
            if not path.is_file():
                raise PanopticDataError(f"{self.paths.annotations}: image {meta['id']} names {path}, which is missing")
        image = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1).float() / 255
        ids = torch.from_numpy(rgb_to_id(np.asarray(Image.open(seg_path).convert("RGB"))))
        if ids.shape != image.shape[1:]:
            raise PanopticDataError(f"{seg_path}: shape {tuple(ids.shape)} differs from its image's {tuple(image.shape[1:])}")
        semantic = torch.full(ids.shape, IGNORE, dtype=torch.int64)
        panoptic = torch.zeros(*ids.shape, 2, dtype=torch.int64)  # VOID category, segment 0
        masks, labels = [], []
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            cat = seg["category_id"]
            if seg.get("iscrowd", 0) or not mask.any():
                continue  # crowd regions stay void / ignored, as in Panoptic FPN training
            panoptic[mask] = torch.tensor([cat, seg["id"]])
            if cat in self.thing_label:
                semantic[mask] = 0
                masks.append(mask)
                labels.append(self.thing_label[cat])
            elif cat in self.stuff_label:
                semantic[mask] = self.stuff_label[cat]
            else:
                raise PanopticDataError(f"{self.paths.annotations}: image {meta['id']}: unknown category_id {cat}")
        h, w = ids.shape
        masks_t = torch.stack(masks).to(torch.uint8) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        boxes = masks_to_boxes(masks_t) if masks else torch.zeros(0, 4)
        # masks_to_boxes gives inclusive pixel coordinates; a one-pixel-wide box would be empty.
        boxes[:, 2:] += 1
        target = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks_t,
                  "semantic": semantic, "panoptic": panoptic, "image_id": int(meta["id"])}
        return image, target


def collate(batch: list) -> tuple[list[Tensor], list[dict]]:
    """Detection-style collate: lists of images and targets (sizes may differ)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


__all__ = ["CocoPanoptic", "IGNORE", "PanopticDataError", "PanopticPaths", "SYNTHETIC_CATEGORIES", "VOID",
           "collate", "id_to_rgb", "rgb_to_id", "write_synthetic"]
