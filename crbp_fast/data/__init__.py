"""Pathfinder data: the procedural generator and the torch datasets (on the fly or on-disk shards).

The public names of :mod:`crbp_fast.tasks.pathfinder.generator` and
:mod:`crbp_fast.tasks.pathfinder.dataset`, where the task keeps them."""

from ..tasks.pathfinder.dataset import EVAL_INDEX_OFFSET, PathfinderDataset, ShardedPathfinder, ShardError, write_shards
from ..tasks.pathfinder.generator import (
    DEFAULT_CONFIG, TASKS, PathfinderConfig, PathfinderError, PathfinderSample, draw, draw_index, generate,
)

__all__ = [
    "DEFAULT_CONFIG", "EVAL_INDEX_OFFSET", "TASKS", "PathfinderConfig", "PathfinderDataset", "PathfinderError",
    "PathfinderSample", "ShardError", "ShardedPathfinder", "draw", "draw_index", "generate", "write_shards",
]
