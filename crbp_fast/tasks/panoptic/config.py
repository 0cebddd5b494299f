"""The configuration of a panoptic training run (no torchvision import: the CLI reads its defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...engine.fixed_point import ALGORITHMS
from ..pathfinder.train import ConfigError

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
FPN_KINDS = ("recurrent", "torchvision")
#: Fields that may change on resume (they do not change what is computed).
RESUMABLE_CHANGES = frozenset({"iterations", "eval_every", "eval_limit", "checkpoint_every", "log_every", "out",
                               "resume", "device", "workers", "progress", "threads", "data", "eval_untrained"})
#: Model fields of the config (the rest is the run).
MODEL_FIELDS = ("backbone", "trainable_layers", "fpn", "fpn_width", "semantic_width", "steps", "algorithm",
                "adjoint_steps", "lcp_target", "cell_backend", "min_size", "max_size", "anchor_sizes")


@dataclass(frozen=True)
class MemoryPreset:
    """A size of the memory sweep (``crbp-fast bench panoptic --preset NAME``): one training
    iteration on ``batch`` random images of ``height`` x ``width``, BPTT at ``bptt_steps`` and
    C-RBP at ``crbp_steps`` (``adjoint_steps`` Neumann products, as published)."""

    batch: int
    height: int
    width: int
    backbone: str
    fpn_width: int
    semantic_width: int
    anchor_sizes: tuple[int, ...]
    bptt_steps: tuple[int, ...] = (1, 2, 3, 4, 5)
    crbp_steps: tuple[int, ...] = (5, 10, 20)
    adjoint_steps: int = 15


#: ``coco``: COCO's training size (2 images of 800 x 1216, ResNet-50, FPN width 256; a GPU);
#: ``cpu``: the stated smaller CPU size (2 images of 256 x 384, ResNet-18, FPN width 64).
MEMORY_PRESETS = {
    "coco": MemoryPreset(2, 800, 1216, "resnet50", 256, 128, (32, 64, 128, 256, 512)),
    "cpu": MemoryPreset(2, 256, 384, "resnet18", 64, 64, (16, 32, 64, 128, 256)),
}


@dataclass
class PanopticTrainConfig:
    """Everything a panoptic training run depends on (stored in each checkpoint)."""

    data: str = "data/synthetic_panoptic"
    split: str = "train"
    eval_split: str = "val"
    train_limit: int | None = None
    eval_limit: int | None = None
    backbone: str = "resnet18"
    trainable_layers: int = 5
    fpn: str = "recurrent"
    fpn_width: int = 32
    semantic_width: int = 32
    steps: int = 5
    algorithm: str = "crbp"
    adjoint_steps: int = 15
    lcp_target: float = 0.95
    lcp_weight: float = 1.0
    cell_backend: str = "auto"
    min_size: int = 64
    max_size: int = 64
    anchor_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    lr: float = 1e-3
    batch_size: int = 4
    iterations: int = 200
    seed: int = 0
    eval_every: int = 0
    eval_untrained: bool = True
    checkpoint_every: int = 50
    log_every: int = 1
    out: str = "runs/panoptic"
    resume: bool = False
    device: str = "auto"
    workers: int = 0
    threads: int = 0
    progress: bool = True

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first field out of range."""
        for name, choices in (("algorithm", ALGORITHMS), ("backbone", BACKBONES), ("fpn", FPN_KINDS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}: expected one of {choices}, got {getattr(self, name)!r}")
        for name, low in (("steps", 1), ("adjoint_steps", 0), ("batch_size", 1), ("iterations", 1), ("fpn_width", 1),
                          ("semantic_width", 1), ("eval_every", 0), ("checkpoint_every", 0), ("log_every", 1),
                          ("workers", 0), ("threads", 0), ("min_size", 16), ("max_size", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected an int >= {low}, got {value!r}")
        for name in ("train_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name}: expected an int >= 0 or None, got {value!r}")
        for name in ("lcp_weight", "lr", "lcp_target"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr: expected a number > 0, got {self.lr!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def model_config(self, num_things: int, num_stuff: int):
        """The :class:`~crbp_fast.tasks.panoptic.model.PanopticConfig` of this run (imports torchvision)."""
        from .model import PanopticConfig

        return PanopticConfig(num_things=num_things, num_stuff=num_stuff,
                              **{k: getattr(self, k) for k in MODEL_FIELDS if k != "anchor_sizes"},
                              anchor_sizes=tuple(self.anchor_sizes))


__all__ = ["BACKBONES", "FPN_KINDS", "MEMORY_PRESETS", "MODEL_FIELDS", "RESUMABLE_CHANGES", "MemoryPreset",
           "PanopticTrainConfig"]
