"""Checkpoints of the published Pathfinder training code, converted to :class:`PathfinderHGRU`'s names.

The published script saves ``{"epoch", "state_dict", "best_prec1"}``, with the model wrapped in
``torch.nn.DataParallel`` (every key prefixed ``module.``) and named after its own modules:

| published          | PathfinderHGRU   |
| ------------------ | ---------------- |
| ``conv0.*``        | ``conv0.*``      |
| ``unit1.*``        | ``cell.*``       |
| ``bn.*``           | ``readout_norm.*`` |
| ``conv6.*``        | ``readout.*``    |

The cell's own parameter names already are the published ones. Its ``unit1.bn.0.*`` and
``unit1.bn.2.*`` are never used by the published step, and are dropped. Tensors are not changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

PUBLISHED_FORMAT = "published-pathfinder"
#: Published module prefix -> this package's.
RENAMES = {"conv0.": "conv0.", "unit1.": "cell.", "bn.": "readout_norm.", "conv6.": "readout."}
_UNUSED = ("unit1.bn.0.", "unit1.bn.2.")
_WRAPPER = "module."


class PublishedCheckpointError(ValueError):
    """Not a checkpoint of the published Pathfinder code, or one this model cannot take (names the key)."""


def _state_of(checkpoint: object, source: str) -> dict:
    """The state dict inside a published checkpoint: the wrapper's ``state_dict``, or the dict itself."""
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise PublishedCheckpointError(
            f"{source}: expected the published training script's dict with a 'state_dict' (or a state dict of "
            f"tensors), got {type(checkpoint).__name__}"
            + (f" with keys {sorted(checkpoint)[:6]}" if isinstance(checkpoint, dict) else ""))
    return checkpoint


def is_published_checkpoint(checkpoint: object) -> bool:
    """Whether a loaded object is in the published layout (wrapper or bare state dict, either prefix)."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        return False
    keys = [k[len(_WRAPPER):] if isinstance(k, str) and k.startswith(_WRAPPER) else k for k in state]
    return any(isinstance(k, str) and k.startswith("unit1.") for k in keys)


def load_published(checkpoint: str | os.PathLike | dict) -> dict:
    """A published checkpoint (a path, or the loaded dict) as ``{"model", "epoch", "best_prec1", "format"}``.

    ``model`` is the state dict under :class:`PathfinderHGRU`'s names (see the module docstring);
    ``epoch`` and ``best_prec1`` are None when the checkpoint is a bare state dict. An already
    converted checkpoint (this function's output, or ``read_checkpoint(..., published=True)``'s)
    is returned as it is.
    """
    if isinstance(checkpoint, dict) and checkpoint.get("format") == PUBLISHED_FORMAT:
        return checkpoint
    source = "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        source = f"checkpoint {path}"
        if not path.is_file():
            raise PublishedCheckpointError(f"{source} does not exist")
        try:
            # weights_only: a published checkpoint holds tensors, ints and floats only.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types for a damaged or foreign file
            raise PublishedCheckpointError(f"{source} cannot be read as a published checkpoint: {err}") from None
    state = _state_of(checkpoint, source)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key[len(_WRAPPER):] if key.startswith(_WRAPPER) else key
        if name.startswith(_UNUSED):
            continue
        prefix = next((p for p in RENAMES if name.startswith(p)), None)
        if prefix is None:
            raise PublishedCheckpointError(
                f"{source}: key {key!r} is not a parameter of the published hGRU model (expected prefixes "
                f"{sorted(RENAMES)}, optionally behind {_WRAPPER!r})")
        out[RENAMES[prefix] + name[len(prefix):]] = value
    wrapper = checkpoint if isinstance(checkpoint, dict) and "state_dict" in checkpoint else {}
    return {"format": PUBLISHED_FORMAT, "model": out, "epoch": wrapper.get("epoch"),
            "best_prec1": wrapper.get("best_prec1")}


def published_shape(state: dict, source: str = "checkpoint") -> dict:
    """``task``, ``channels`` and ``kernel_size`` of a converted published state dict, read from its shapes."""
    try:
        c, _, k, k2 = state["cell.w_gate_inh"].shape
        readout = state["readout.weight"]
    except (KeyError, ValueError) as err:
        raise PublishedCheckpointError(f"{source}: no hGRU cell or readout in the checkpoint ({err!r})") from None
    if k != k2 or readout.dim() != 4:
        raise PublishedCheckpointError(
            f"{source}: expected square horizontal kernels and a 1x1 conv readout (published segmentation model), "
            f"got w_gate_inh {tuple(state['cell.w_gate_inh'].shape)}, conv6 {tuple(readout.shape)}")
    return {"task": "segmentation", "channels": int(c), "kernel_size": int(k), "norm": "batch"}


__all__ = ["PUBLISHED_FORMAT", "PublishedCheckpointError", "is_published_checkpoint", "load_published",
           "published_shape"]
