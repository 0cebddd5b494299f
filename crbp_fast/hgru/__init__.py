"""The hGRU cell: reference passes, backends, and the module."""

from .cell import HGRUCell

__all__ = ["HGRUCell"]
