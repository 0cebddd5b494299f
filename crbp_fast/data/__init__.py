"""Pathfinder data: the procedural generator and the torch datasets (on the fly or on-disk shards)."""

from .dataset import EVAL_INDEX_OFFSET, PathfinderDataset, ShardedPathfinder, ShardError, write_shards
from .pathfinder import (
    DEFAULT_CONFIG, TASKS, PathfinderConfig, PathfinderError, PathfinderSample, draw, draw_index, generate,
)

__all__ = [
    "DEFAULT_CONFIG", "EVAL_INDEX_OFFSET", "TASKS", "PathfinderConfig", "PathfinderDataset", "PathfinderError",
    "PathfinderSample", "ShardError", "ShardedPathfinder", "draw", "draw_index", "generate", "write_shards",
]
