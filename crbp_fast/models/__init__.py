"""Models for Pathfinder: the hGRU with its Gabor drive and readout, the focal loss, the metrics."""

from .gabor import gabor_bank
from .losses import focal_loss
from .metrics import METRICS, confusion, scores
from .pathfinder_hgru import PathfinderHGRU, PathfinderOutput

__all__ = ["METRICS", "PathfinderHGRU", "PathfinderOutput", "confusion", "focal_loss", "gabor_bank", "scores"]


def __getattr__(name: str):
    # RecurrentFPN subclasses torchvision's FPN: import torchvision only when it is asked for, so
    # that the core package imports without it.
    if name == "RecurrentFPN":
        from ..panoptic.fpn import RecurrentFPN

        return RecurrentFPN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
