"""The tasks built on the engine and the cells, each with its data, model, trainer and diagnostics
side by side: :mod:`.pathfinder` (contour segmentation / classification, the hGRU) and
:mod:`.panoptic` (the recurrent Panoptic FPN on torchvision; needs torchvision)."""
