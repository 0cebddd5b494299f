"""The recurrent Panoptic FPN task (needs torchvision, torchmetrics and pycocotools).

- :mod:`.fpn`: :class:`RecurrentFPN`, the drop-in for torchvision's FeaturePyramidNetwork.
- :mod:`.data`: the synthetic COCO-panoptic writer and the COCO-panoptic reader.
- :mod:`.model`: Panoptic FPN from torchvision's Mask R-CNN, a semantic head, the panoptic merge.
- :mod:`.metrics`: panoptic quality through torchmetrics.
- :mod:`.train`: ``crbp-fast panoptic train`` / ``eval``; :mod:`.memory`: the memory preset.

The submodules import torchvision; this package's ``__init__`` does not, so that
``crbp-fast --help`` works without it.
"""
