"""Structured states for the engine: a state is a tensor, or any nested tuple / list / dict of tensors.

The engine (:func:`crbp_fast.engine.fixed_point`, the solvers, the LCP, the stats) works on the list of
a state's tensors (its *leaves*, in ``torch.utils._pytree`` order) and calls the step ``f`` with the
structure rebuilt, so ``f(x, (h, c)) -> (h, c)`` (a ConvLSTM) or ``f(x, [h1, h2, h3])`` (one state
per FPN level) run with every algorithm, solver and adjoint exactly as a single tensor does.

Conventions, shared by every part of the engine:
- every leaf is a floating tensor with a leading batch dimension of the same size B, all on one
  device and of one dtype (the residuals are per sample, Anderson mixes one flat row per sample);
- the size of a state is the 2-norm over all its leaves together (so a per-sample relative
  residual is ||h_new - h_old|| / ||h_new|| over every leaf of that sample);
- the adjoint and Anderson see the state flattened to one vector (per sample for Anderson):
  :func:`flat` / :func:`unflat`; a single-tensor state is never copied for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class StateSpec:
    """How to rebuild a state from its leaves, and what each leaf must look like."""

    tree: pytree.TreeSpec
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def single(self) -> bool:
        """A plain tensor state (not a structure)."""
        return self.tree.is_leaf()

    @property
    def batch(self) -> int:
        return self.shapes[0][0]

    def unflatten(self, leaves: list[Tensor] | tuple[Tensor, ...]):
        return leaves[0] if self.single else pytree.tree_unflatten(list(leaves), self.tree)

    def describe(self) -> str:
        if self.single:
            return f"a tensor of shape {tuple(self.shapes[0])}"
        return f"{_structure(self.tree)} with leaf shapes {[tuple(s) for s in self.shapes]}"


def _structure(tree: pytree.TreeSpec) -> str:
    """A short text of a structure: ``tuple(*, *)``, ``dict(a=*, b=*)``."""
    if tree.is_leaf():
        return "*"
    children = tree.children() if hasattr(tree, "children") else tree.children_specs
    kids = [_structure(c) for c in children]
    name = getattr(tree.type, "__name__", str(tree.type))
    if tree.type is dict or name.endswith("dict"):
        kids = [f"{k}={c}" for k, c in zip(tree.context, kids)]
    return f"{name}({', '.join(kids)})"


def _describe_value(value) -> str:
    leaves, tree = pytree.tree_flatten(value)
    if tree.is_leaf():
        return type(value).__name__ if not isinstance(value, Tensor) else f"a tensor of shape {tuple(value.shape)}"
    kinds = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in leaves]
    return f"{_structure(tree)} with leaves {kinds}"


def state_spec(arg: str, value, expected: str | None = None) -> tuple[list[Tensor], StateSpec]:
    """The leaves and spec of a state given as ``arg``; ``TypeError`` / ``ValueError`` naming ``arg``.

    Expected: a floating tensor, or a (nested) tuple / list / dict of floating tensors that share
    the leading (batch) dimension, the dtype and the device.
    """
    expected = expected or ("a floating torch.Tensor, or a (nested) tuple / list / dict of floating tensors "
                            "with one batch size, dtype and device")
    leaves, tree = pytree.tree_flatten(value)
    if not leaves:
        raise ValueError(f"{arg}: expected {expected}, got {_describe_value(value) if value is not None else 'None'} "
                         f"(no tensors)")
    bad = [type(v).__name__ for v in leaves if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{arg}: expected {expected}, got {_describe_value(value)} ({bad[0]} is not a tensor)")
    first = leaves[0]
    for i, leaf in enumerate(leaves):
        where = "" if tree.is_leaf() else f" (leaf {i} of {_structure(tree)})"
        if not leaf.is_floating_point():
            raise TypeError(f"{arg}: expected floating tensors, got {leaf.dtype}{where}")
        if leaf.dim() == 0:
            raise ValueError(f"{arg}: expected tensors with a leading batch dimension, got a 0-d tensor{where}")
        if leaf.shape[0] != first.shape[0]:
            raise ValueError(f"{arg}: expected every tensor to have the batch size {first.shape[0]} of the first, "
                             f"got {_describe_value(value)}")
        if leaf.dtype != first.dtype:
            raise TypeError(f"{arg}: expected every tensor to have the dtype {first.dtype} of the first, "
                            f"got {leaf.dtype}{where}")
        if leaf.device != first.device:
            raise ValueError(f"{arg}: expected every tensor on the device {first.device} of the first, "
                             f"got {leaf.device}{where}")
    return leaves, StateSpec(tree, tuple(v.shape for v in leaves), first.dtype, first.device)


def check_output(out, spec: StateSpec) -> list[Tensor]:
    """The leaves of ``f(x, h)``'s result, refused (naming ``f``) unless it is a state like h."""
    if spec.single:
        if not isinstance(out, Tensor):
            raise TypeError(f"f: expected f(x, h) to return a torch.Tensor like h, got {type(out).__name__}")
        leaves = [out]
    else:
        leaves, tree = pytree.tree_flatten(out)
        if tree != spec.tree or not all(isinstance(v, Tensor) for v in leaves):
            raise TypeError(
                f"f: expected f(x, h) to return a state of h's structure, {spec.describe()}, got {_describe_value(out)}")
    for i, (leaf, shape) in enumerate(zip(leaves, spec.shapes)):
        where = "" if spec.single else f" (leaf {i})"
        if leaf.shape != shape:
            raise ValueError(
                f"f: expected f(x, h) to return a state of h's shape {tuple(shape)}{where}, got {tuple(leaf.shape)}; "
                f"a fixed-point step maps a state to a state of the same shape"
            )
        if leaf.dtype != spec.dtype and not torch.is_autocast_enabled(spec.device.type):
            raise TypeError(f"f: expected f(x, h) to return h's dtype {spec.dtype}{where}, got {leaf.dtype}")
        if leaf.device != spec.device:
            raise ValueError(f"f: expected f(x, h) to return a state on h's device {spec.device}{where}, got {leaf.device}")
    return leaves


def sq_norms(leaves, per_sample: bool = True) -> Tensor:
    """Squared 2-norm over all leaves (float32 or wider), per sample (B,) or in all (0-d)."""
    total = None
    for leaf in leaves:
        v = leaf.float() if leaf.dtype in (torch.float16, torch.bfloat16) else leaf
        s = v.pow(2).flatten(1).sum(1) if per_sample else v.pow(2).sum()
        total = s if total is None else total + s
    return total


def relative_residual(new: list[Tensor], old: list[Tensor]) -> Tensor:
    """Per sample ||new - old|| / ||new|| over every leaf (B,), float32 (float64 for float64 states)."""
    if len(new) == 1:
        h_new, h_old = new[0], old[0]
        dims = tuple(range(1, h_new.dim()))
        num = torch.linalg.vector_norm((h_new - h_old).float(), dim=dims)
        den = torch.linalg.vector_norm(h_new.float(), dim=dims)
    else:
        num = sq_norms([(a - b).float() for a, b in zip(new, old)]).sqrt()
        den = sq_norms([a.float() for a in new]).sqrt()
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


def flat(leaves: list[Tensor] | tuple[Tensor, ...], batch: int | None = None) -> Tensor:
    """One tensor of a state: the leaf itself (no copy) for a single tensor; else the leaves
    concatenated, as one vector (``batch`` None) or as (B, D) rows (``batch`` = B)."""
    if len(leaves) == 1:
        return leaves[0] if batch is None else leaves[0].reshape(batch, -1)
    if batch is None:
        return torch.cat([v.reshape(-1) for v in leaves])
    return torch.cat([v.reshape(batch, -1) for v in leaves], dim=1)


def unflat(z: Tensor, shapes, batch: int | None = None) -> list[Tensor]:
    """The inverse of :func:`flat` (views of ``z``)."""
    if len(shapes) == 1:
        return [z.reshape(shapes[0])]
    if batch is None:
        sizes = [s.numel() for s in shapes]
        return [p.reshape(s) for p, s in zip(z.split(sizes), shapes)]
    sizes = [s.numel() // batch for s in shapes]
    return [p.reshape(s) for p, s in zip(z.split(sizes, dim=1), shapes)]


def primary(state) -> Tensor:
    """The tensor a readout or a diagnosis looks at: the state itself, or its first leaf (the h of
    a ConvLSTM's (h, c))."""
    if isinstance(state, Tensor):
        return state
    leaves, _ = pytree.tree_flatten(state)
    if not leaves or not isinstance(leaves[0], Tensor):
        raise TypeError(f"state: expected a tensor or a structure of tensors, got {_describe_value(state)}")
    return leaves[0]


__all__ = ["StateSpec", "check_output", "flat", "primary", "relative_residual", "sq_norms", "state_spec", "unflat"]
