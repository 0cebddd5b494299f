"""Panoptic FPN from torchvision parts: Mask R-CNN on a ResNet-FPN, a semantic head, the merge.

- Backbone: a torchvision ResNet (``weights=None``: nothing downloads) with torchvision's FPN
  extractor, whose FPN is swapped for :class:`~crbp_fast.tasks.panoptic.fpn.RecurrentFPN`
  (``fpn="recurrent"``) or kept (``fpn="torchvision"``, the feed-forward baseline).
- Instances: torchvision's ``MaskRCNN`` heads (RPN, box and mask heads) on the FPN levels.
- Stuff: the Panoptic FPN semantic head (Kirillov et al. 2019): from each of P2..P5, 3x3 conv +
  GroupNorm + ReLU stages with 2x upsampling down to stride 4, summed, a 1x1 conv to
  ``1 + num_stuff`` classes (0 = "a thing"), upsampled 4x; cross-entropy with IGNORE.
- Loss: the Mask R-CNN losses + ``semantic_weight`` x the semantic loss (+ the FPN's LCP
  penalty, weighted by the trainer).
- Inference: :func:`panoptic_merge`, the standard heuristic: instances by score (score >=
  ``score_threshold``, masks at 0.5, dropped when more than ``overlap_threshold`` of the instance
  is already taken), then stuff regions of at least ``stuff_area`` pixels where nothing is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ...engine.fixed_point import ALGORITHMS
from .config import BACKBONES, FPN_KINDS
from .data import IGNORE, VOID
from .fpn import RecurrentFPN, default_groups



@dataclass
class PanopticConfig:
    """The model's shape and its recurrence (stored in checkpoints)."""

    num_things: int
    num_stuff: int
    backbone: str = "resnet18"
    trainable_layers: int = 5
    fpn: str = "recurrent"
    fpn_width: int = 256
    semantic_width: int = 128
    steps: int = 5
    algorithm: str = "crbp"
    adjoint_steps: int = 15
    lcp_target: float = 0.95
    cell_backend: str = "auto"
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    semantic_weight: float = 0.5

    def check(self) -> None:
        for name, low in (("num_things", 1), ("num_stuff", 1), ("fpn_width", 1), ("semantic_width", 1), ("steps", 1),
                          ("adjoint_steps", 0), ("min_size", 16), ("max_size", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {BACKBONES}, got {self.backbone!r}")
        if self.fpn not in FPN_KINDS:
            raise ValueError(f"fpn: expected one of {FPN_KINDS}, got {self.fpn!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {self.algorithm!r}")
        if not (isinstance(self.trainable_layers, int) and 0 <= self.trainable_layers <= 5):
            raise ValueError(f"trainable_layers: expected an int in 0..5, got {self.trainable_layers!r}")
        if len(self.anchor_sizes) != 5 or any(not isinstance(a, int) or a < 1 for a in self.anchor_sizes):
            raise ValueError(f"anchor_sizes: expected 5 positive ints (P2..P6), got {self.anchor_sizes!r}")


class SemanticHead(nn.Module):
    """The Panoptic FPN semantic branch on P2..P5 (strides 4, 8, 16, 32)."""

    def __init__(self, in_channels: int, width: int, num_classes: int, levels: int = 4):
        super().__init__()
        groups = default_groups(width)

        def stage(c_in: int, upsample: bool) -> list[nn.Module]:
            mods: list[nn.Module] = [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width),
                                     nn.ReLU(inplace=True)]
            if upsample:
                mods.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            return mods

        self.scale_heads = nn.ModuleList()
        for level in range(levels):  # level l has stride 4 * 2^l: l upsampling stages (one conv at P2)
            mods = stage(in_channels, level > 0)
            for k in range(1, level):
                mods += stage(width, True)
            self.scale_heads.append(nn.Sequential(*mods))
        self.predictor = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Logits at stride 4 of the padded batch."""
        size = features[0].shape[-2:]
        out = 0
        for head, feat in zip(self.scale_heads, features):
            y = head(feat)
            # Odd padded sizes make 2^l upsampling miss by a pixel: align to P2.
            out = out + (y if y.shape[-2:] == size else F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.predictor(out)


@dataclass
class PanopticOutput:
    """Training: ``losses`` (named scalars) and ``penalty``; inference: ``results`` per image."""

    losses: dict[str, Tensor] | None
    penalty: Tensor | None
    results: list[dict] | None


class PanopticFPN(nn.Module):
    """Panoptic FPN (Mask R-CNN + semantic head) with an optionally recurrent FPN.

    ``model(images, targets)`` in training returns :class:`PanopticOutput` with the losses; in
    eval ``model(images)`` returns per-image dicts with ``boxes``, ``labels``, ``scores``,
    ``masks`` (torchvision's), ``semantic`` (H, W) and ``panoptic`` (H, W, 2) (category id,
    segment id) in the original image size. Category ids are the dataset's: pass ``things`` and
    ``stuffs`` (the dataset's category ids, in label order).
    """

    def __init__(self, config: PanopticConfig, things: list[int], stuffs: list[int]):
        super().__init__()
        config.check()
        if len(things) != config.num_things or len(stuffs) != config.num_stuff:
            raise ValueError(f"things / stuffs: expected {config.num_things} / {config.num_stuff} category ids, "
                             f"got {len(things)} / {len(stuffs)}")
        self.config = config
        self.things, self.stuffs = list(things), list(stuffs)
        body = getattr(resnet, config.backbone)(weights=None)
        backbone = _resnet_fpn_extractor(body, config.trainable_layers, extra_blocks=LastLevelMaxPool())
        backbone.out_channels = config.fpn_width
        in_channels = [m.out_channels for m in _stage_outputs(body)]
        if config.fpn == "recurrent":
            backbone.fpn = RecurrentFPN(
                in_channels, config.fpn_width, extra_blocks=LastLevelMaxPool(), steps=config.steps,
                algorithm=config.algorithm, adjoint_steps=config.adjoint_steps, lcp_target=config.lcp_target,
                cell_options={"backend": config.cell_backend})
        else:
            from torchvision.ops import FeaturePyramidNetwork

            backbone.fpn = FeaturePyramidNetwork(in_channels, config.fpn_width, extra_blocks=LastLevelMaxPool())
        anchors = AnchorGenerator(tuple((a,) for a in config.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        self.detector = MaskRCNN(backbone, num_classes=config.num_things + 1, min_size=config.min_size,
                                 max_size=config.max_size, rpn_anchor_generator=anchors)
        self.semantic_head = SemanticHead(config.fpn_width, config.semantic_width, config.num_stuff + 1)

    @property
    def fpn(self) -> nn.Module:
        return self.detector.backbone.fpn

    def _semantic_targets(self, targets: list[dict], image_sizes: list[tuple[int, int]], padded: tuple[int, int],
                          device: torch.device) -> Tensor:
        """Semantic targets resized as the transform resized the images, padded with IGNORE."""
        out = torch.full((len(targets), *padded), IGNORE, dtype=torch.int64, device=device)
        for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
            sem = t["semantic"].to(device)
            if sem.shape != (h, w):
                sem = F.interpolate(sem[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
            out[i, :h, :w] = sem
        return out

    def forward(self, images: list[Tensor], targets: list[dict] | None = None) -> PanopticOutput:
        det = self.detector
        if self.training and targets is None:
            raise ValueError("targets: required in training mode (call model.eval() for inference)")
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        det_targets = None
        if targets is not None:
            det_targets = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
        image_list, det_targets = det.transform(images, det_targets)
        features = det.backbone(image_list.tensors)
        penalty = getattr(self.fpn, "penalty", None)
        proposals, rpn_losses = det.rpn(image_list, features, det_targets)
        detections, roi_losses = det.roi_heads(features, proposals, image_list.image_sizes, det_targets)
        levels = [features[k] for k in list(features.keys())[:4]]  # P2..P5 (not the max-pooled P6)
        logits = self.semantic_head(levels)
        padded = image_list.tensors.shape[-2:]
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        if self.training:
            sem_target = self._semantic_targets(targets, image_list.image_sizes, padded, logits.device)
            sem_loss = F.cross_entropy(logits, sem_target, ignore_index=IGNORE)
            losses = {**rpn_losses, **roi_losses, "loss_semantic": self.config.semantic_weight * sem_loss}
            return PanopticOutput(losses, penalty, None)
        detections = det.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        results = []
        for i, (d, (h, w), size) in enumerate(zip(detections, image_list.image_sizes, original_sizes)):
            sem_logits = logits[i:i + 1, :, :h, :w]
            if (h, w) != size:
                sem_logits = F.interpolate(sem_logits, size=size, mode="bilinear", align_corners=False)
            semantic = sem_logits[0].argmax(0)
            d["semantic"] = semantic
            d["panoptic"] = panoptic_merge(d, semantic, self.things, self.stuffs)
            results.append(d)
        return PanopticOutput(None, penalty, results)


def _stage_outputs(body: nn.Module) -> list[nn.Module]:
    """The last conv of each ResNet stage (layer1..layer4), whose out_channels the FPN takes."""
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        block = getattr(body, name)[-1]
        outs.append(block.conv3 if hasattr(block, "conv3") else block.conv2)
    return outs


def panoptic_merge(detections: dict, semantic: Tensor, things: list[int], stuffs: list[int], *,
                   score_threshold: float = 0.5, overlap_threshold: float = 0.5,
                   stuff_area: int | None = None) -> Tensor:
    """The Panoptic FPN merge of instances and stuff into (H, W, 2) (category id, segment id).

    Args:
        detections: ``scores`` (N,), ``labels`` (N,) in 1..T, ``masks`` (N, 1, H, W) probabilities.
        semantic: (H, W) predicted semantic classes (0 = a thing, 1..S = ``stuffs[c - 1]``).
        things, stuffs: the category ids of labels 1..T and semantic classes 1..S.
        score_threshold, overlap_threshold: as detectron2's defaults (0.5, 0.5).
        stuff_area: smallest stuff region kept (default: 4096 pixels at COCO's 800-pixel side,
            scaled by the image area, so that small images keep their stuff).

    Pixels nothing claims get category ``VOID`` (0).
    """
    h, w = semantic.shape
    if stuff_area is None:
        stuff_area = max(1, int(4096 * h * w / (800 * 1216)))
    segments = torch.zeros(h, w, dtype=torch.int64, device=semantic.device)
    categories = torch.full((h, w), VOID, dtype=torch.int64, device=semantic.device)
    next_id = 1
    order = torch.argsort(detections["scores"], descending=True)
    for i in order.tolist():
        if float(detections["scores"][i]) < score_threshold:
            break
        mask = detections["masks"][i, 0] >= 0.5
        area = int(mask.sum())
        if area == 0:
            continue
        taken = segments > 0
        if int((mask & taken).sum()) > overlap_threshold * area:
            continue
        mask &= ~taken
        segments[mask] = next_id
        categories[mask] = things[int(detections["labels"][i]) - 1]
        next_id += 1
    free = segments == 0
    for c, cat in enumerate(stuffs, start=1):
        mask = (semantic == c) & free
        if int(mask.sum()) < stuff_area:
            continue
        segments[mask] = next_id
        categories[mask] = cat
        next_id += 1
    return torch.stack([categories, segments], dim=-1)



__all__ = ["BACKBONES", "FPN_KINDS", "PanopticConfig", "PanopticFPN", "PanopticOutput", "SemanticHead",
           "panoptic_merge"]
