"""The tasks' models, by their public names: for Pathfinder the hGRU with its Gabor drive and
readout, the focal loss, the metrics and the published-checkpoint reader (kept in
:mod:`crbp_fast.tasks.pathfinder`); for the panoptic task ``RecurrentFPN`` (in
:mod:`crbp_fast.tasks.panoptic.fpn`; imported on first use, as it needs torchvision)."""

from ..tasks.pathfinder.gabor import brightness_blob, gabor_bank, published_bank
from ..tasks.pathfinder.losses import FOCAL_VARIANTS, focal_loss
from ..tasks.pathfinder.metrics import METRICS, confusion, scores
from ..tasks.pathfinder.model import CONV0_BANKS, READOUT_INITS, PathfinderHGRU, PathfinderOutput
from ..tasks.pathfinder.published import PUBLISHED_FORMAT, PublishedCheckpointError, is_published_checkpoint, load_published

__all__ = [
    "CONV0_BANKS", "FOCAL_VARIANTS", "METRICS", "PUBLISHED_FORMAT", "READOUT_INITS", "PathfinderHGRU",
    "PathfinderOutput", "PublishedCheckpointError", "brightness_blob", "confusion", "focal_loss", "gabor_bank",
    "is_published_checkpoint", "load_published", "published_bank", "scores",
]


def __getattr__(name: str):
    # RecurrentFPN subclasses torchvision's FPN: import torchvision only when it is asked for, so
    # that the core package imports without it.
    if name == "RecurrentFPN":
        from ..tasks.panoptic.fpn import RecurrentFPN

        return RecurrentFPN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
