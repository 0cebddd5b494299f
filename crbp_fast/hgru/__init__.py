"""The hGRU cell: reference passes, backends, and the module; and its convolutional FPN variant."""

from .cell import HGRUCell
from .conv_hgru import ConvHGRUCell

__all__ = ["ConvHGRUCell", "HGRUCell"]
