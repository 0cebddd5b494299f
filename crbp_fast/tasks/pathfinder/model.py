"""The Pathfinder hGRU (DESIGN section 2): Gabor drive, the recurrent cell, a normalised readout."""

from __future__ import annotations

import math
import os
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from .generator import check_task
from ...engine.fixed_point import ADJOINT_RULES, ADJOINT_SOLVERS, ALGORITHMS, FixedPointStats, fixed_point
from ...hgru import HGRUCell
from ...cells import STANDARD_CELLS, ConvGRUCell, ConvLSTMCell
from ...engine.state import primary
from .gabor import gabor_bank, published_bank
from .published import PublishedCheckpointError, load_published, published_shape

DRIVE_KERNEL = 7
#: conv0's initial bank: ``"published"`` (:func:`published_bank`, conv0's bias at torch's default
#: init as the published model keeps it) or ``"zero_mean"`` (:func:`gabor_bank`, bias zeroed: this
#: package's earlier init).
CONV0_BANKS = ("published", "zero_mean")
#: The segmentation readout's init: ``"published"`` (xavier-normal weight, bias log(0.99 / 0.01)
#: as the published ``conv6``) or ``"torch"`` (torch's default init).
READOUT_INITS = ("published", "torch")
#: The recurrent cell: the hGRU (the paper's, default) or a standard cell (crbp_fast.cells), e.g.
#: for the supplementary material's comparison of a ConvLSTM's state space with the hGRU's.
CELLS = ("hgru",) + STANDARD_CELLS


class PathfinderOutput(NamedTuple):
    """``logits``: (B, 2, H, W) for segmentation, (B, 2) for classification; ``penalty``: LCP or None."""

    logits: Tensor
    penalty: Tensor | None
    stats: FixedPointStats


def readout_norm(kind: str, channels: int, groups: int, eps: float = 1e-3) -> nn.Module:
    """The readout's normalisation, of the cell's kind: batch statistics, GroupNorm or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=eps, track_running_stats=False)
    if kind == "group":
        return nn.GroupNorm(groups, channels, eps=eps)
    return nn.Identity()


class PathfinderHGRU(nn.Module):
    """hGRU for Pathfinder: x = conv0(image)^2, h_N by ``fixed_point``, then a readout.

    - ``conv0``: 7 x 7, 1 -> ``channels``, padding 3, initialised with the bank ``conv0_bank``
      names (:data:`CONV0_BANKS`; default the published structure, :func:`published_bank`).
    - ``cell``: :class:`crbp_fast.HGRUCell` run from h0 = 0 for ``steps`` steps with
      ``algorithm`` (bptt, cbptt, rbp, crbp).
    - segmentation: ``readout_norm`` (BatchNorm with batch statistics, as the cell's ``norm``)
      -> ``readout`` 1 x 1 conv to 2 per-pixel logits (initialised as ``readout_init`` says);
      classification: ``readout_norm`` -> global max pooling -> ``readout`` linear to 2.

    Args:
        task: ``"segmentation"`` or ``"classification"``.
        channels: C (25 in the paper).
        kernel_size: k of the horizontal kernels (15 in the paper).
        steps: N, recurrent steps in training and evaluation.
        algorithm: training algorithm of :func:`crbp_fast.engine.fixed_point`.
        norm: ``"batch"`` (published), ``"group"`` or ``"none"``, for the cell and the readout.
        backend, conv, gate_bias_init, norm_groups: passed to :class:`HGRUCell`.
        adjoint_steps, adjoint_tol, adjoint_solver, adjoint_rule, lcp_target: passed to
            :func:`crbp_fast.engine.fixed_point`. ``adjoint_rule="published"`` (with ``adjoint_steps=15``)
            is the published training code's adjoint; it stops on its own absolute rules and does
            not use ``adjoint_tol``. The default, ``"relative"``, is a deliberate difference
            (docs/fidelity.md): its stop does not depend on the loss scale.
        conv0_bank: :data:`CONV0_BANKS`. readout_init: :data:`READOUT_INITS` (segmentation;
            the classification readout, which the published code does not have, keeps torch's init).
        cell: :data:`CELLS`: ``"hgru"`` (default), ``"convgru"`` (:class:`crbp_fast.ConvGRUCell`)
            or ``"convlstm"`` (:class:`crbp_fast.ConvLSTMCell`, state (h, c); the readout reads h),
            C -> C channels with k x k kernels; ``norm`` then applies to the readout only, and
            ``backend``, ``conv``, ``gate_bias_init`` and ``norm_groups`` to the hGRU only.

    A checkpoint written by the published training script loads with :meth:`from_published`.

    Example:
        >>> model = PathfinderHGRU("segmentation", channels=25, kernel_size=15, steps=20, algorithm="crbp")
        >>> out = model(images)                     # images (B, 1, 150, 150) in [0, 1]
        >>> loss = focal_loss(out.logits, masks) + 10 * out.penalty
    """

    def __init__(
        self, task: str = "segmentation", channels: int = 25, kernel_size: int = 15, *, steps: int = 20,
        algorithm: str = "crbp", norm: str = "batch", backend: str = "auto", conv: str = "auto",
        gate_bias_init: str = "published", norm_groups: int = 1, adjoint_steps: int = 15,
        adjoint_tol: float = 1e-5, adjoint_solver: str = "neumann", adjoint_rule: str = "relative",
        lcp_target: float = 0.9, conv0_bank: str = "published", readout_init: str = "published",
        cell: str = "hgru",
    ):
        super().__init__()
        self.task = check_task(task)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        for arg, value, choices in (("adjoint_solver", adjoint_solver, ADJOINT_SOLVERS),
                                    ("adjoint_rule", adjoint_rule, ADJOINT_RULES), ("conv0_bank", conv0_bank, CONV0_BANKS),
                                    ("readout_init", readout_init, READOUT_INITS), ("cell", cell, CELLS)):
            if value not in choices:
                raise ValueError(f"{arg}: expected one of {choices}, got {value!r}")
        if adjoint_rule == "published" and adjoint_solver != "neumann":
            # The published stopping rules are rules of the Neumann series; Anderson has none.
            raise ValueError(
                f"adjoint_rule: 'published' applies to adjoint_solver='neumann', got adjoint_solver={adjoint_solver!r}")
        self.steps, self.algorithm = steps, algorithm
        self.adjoint_steps, self.adjoint_tol, self.lcp_target = adjoint_steps, adjoint_tol, lcp_target
        self.adjoint_solver, self.adjoint_rule = adjoint_solver, adjoint_rule
        if cell == "hgru":
            self.cell = HGRUCell(
                channels, kernel_size, norm=norm, gate_bias_init=gate_bias_init, backend=backend, conv=conv,
                norm_groups=norm_groups,
            )
        elif cell == "convgru":
            self.cell = ConvGRUCell(channels, channels, kernel_size)
        else:
            self.cell = ConvLSTMCell(channels, channels, kernel_size)
        self.conv0 = nn.Conv2d(1, channels, DRIVE_KERNEL, padding=DRIVE_KERNEL // 2)
        with torch.no_grad():
            if conv0_bank == "published":
                # Only the weight is replaced: the published model keeps conv0's default bias init.
                self.conv0.weight.copy_(published_bank(channels, DRIVE_KERNEL))
            else:
                self.conv0.weight.copy_(gabor_bank(channels, DRIVE_KERNEL))
                self.conv0.bias.zero_()
        self.readout_norm = readout_norm(norm, channels, getattr(self.cell, "norm_groups", norm_groups))
        self.readout = nn.Conv2d(channels, 2, 1) if task == "segmentation" else nn.Linear(channels, 2)
        if task == "segmentation" and readout_init == "published":
            nn.init.xavier_normal_(self.readout.weight)
            # Equal for both classes, so the softmax ignores it; kept so that parameters match.
            nn.init.constant_(self.readout.bias, math.log((1 - 0.01) / 0.01))
        self.config = {
            "task": task, "channels": channels, "kernel_size": kernel_size, "steps": steps, "algorithm": algorithm,
            "norm": norm, "backend": backend, "conv": conv, "gate_bias_init": gate_bias_init,
            "norm_groups": norm_groups, "adjoint_steps": adjoint_steps, "adjoint_tol": adjoint_tol,
            "adjoint_solver": adjoint_solver, "adjoint_rule": adjoint_rule, "lcp_target": lcp_target,
            "conv0_bank": conv0_bank, "readout_init": readout_init, "cell": cell,
        }

    @classmethod
    def from_published(cls, checkpoint: "str | os.PathLike | dict", *, steps: int, **options) -> "PathfinderHGRU":
        """The model of a checkpoint written by the published Pathfinder training script, strictly loaded.

        Args:
            checkpoint: a path, or the loaded object: the script's ``{"epoch", "state_dict",
                "best_prec1"}`` or the bare state dict, with or without DataParallel's ``module.``
                (or what ``read_checkpoint(path, published=True)`` returns).
            steps: N. The checkpoint does not record it (the published script sets it in code),
                so it is asked for.
            options: any other argument of :class:`PathfinderHGRU` (algorithm, backend, adjoint_rule,
                ...). ``task``, ``channels``, ``kernel_size`` and ``norm`` come from the checkpoint.

        Raises:
            PublishedCheckpointError: not a published checkpoint, or a parameter that does not fit
                (the message names it).

        Example:
            >>> model = PathfinderHGRU.from_published("model_fscore_9500_epoch_19_checkpoint.pth.tar", steps=6)
        """
        ckpt = load_published(checkpoint)
        source = f"checkpoint {checkpoint}" if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
        shape = published_shape(ckpt["model"], source)
        for name in ("task", "channels", "kernel_size", "norm"):
            if name in options:
                raise TypeError(f"{name}: comes from the checkpoint ({shape[name]!r}); do not pass it, got {options[name]!r}")
        model = cls(shape["task"], shape["channels"], shape["kernel_size"], steps=steps, norm="batch", **options)
        own = model.state_dict()
        missing = [k for k in own if k not in ckpt["model"]]
        unexpected = [k for k in ckpt["model"] if k not in own]
        wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in ckpt["model"].items()
                 if k in own and v.shape != own[k].shape]
        if missing or unexpected or wrong:
            raise PublishedCheckpointError(
                f"{source}: does not fit PathfinderHGRU(channels={shape['channels']}, kernel_size={shape['kernel_size']}): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {wrong[:5]}")
        model.load_state_dict(ckpt["model"], strict=True)
        return model

    def drive(self, images: Tensor) -> Tensor:
        """x = conv0(images)^2, (B, C, H, W), from images (B, 1, H, W)."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images: expected shape (B, 1, H, W), got {tuple(images.shape)}")
        return self.conv0(images).pow(2)

    def head(self, h) -> Tensor:
        """Logits from a state h (B, C, H, W) (or a ConvLSTM's (h, c): its h): (B, 2, H, W) or (B, 2)."""
        z = self.readout_norm(primary(h))
        if self.task == "classification":
            z = z.amax(dim=(2, 3))
        return self.readout(z)

    def forward(self, images: Tensor, steps: int | None = None) -> PathfinderOutput:
        """Logits after ``steps`` (default ``self.steps``) recurrent steps, the LCP penalty, the stats."""
        x = self.drive(images)
        res = fixed_point(
            self.cell, x, steps=self.steps if steps is None else steps, algorithm=self.algorithm,
            adjoint_steps=self.adjoint_steps, adjoint_tol=self.adjoint_tol, adjoint_solver=self.adjoint_solver,
            adjoint_rule=self.adjoint_rule, lcp_target=self.lcp_target,
        )
        return PathfinderOutput(self.head(res.state), res.penalty, res.stats)

    @torch.no_grad()
    def trajectory(self, images: Tensor, steps: int) -> Iterator:
        """The states h_1 .. h_steps from h0 = 0, one at a time, without a graph (a ConvLSTM's as
        (h, c) pairs)."""
        x = self.drive(images)
        h = self.cell.init_state(x) if hasattr(self.cell, "init_state") else torch.zeros_like(x)
        for _ in range(steps):
            h = self.cell(x, h)
            yield h


__all__ = ["CELLS", "CONV0_BANKS", "READOUT_INITS", "PathfinderHGRU", "PathfinderOutput", "PublishedCheckpointError",
           "readout_norm"]
