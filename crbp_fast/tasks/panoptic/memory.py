"""Memory of one Panoptic FPN training iteration as N grows: BPTT against C-RBP (the paper's table).

The benchmark suite's ``panoptic`` preset (``crbp-fast bench panoptic --preset cpu|coco``; also
``crbp-fast panoptic memory``). One iteration = the forward of
:class:`~crbp_fast.tasks.panoptic.model.PanopticFPN` (Mask R-CNN losses + semantic loss + the FPN's
LCP penalty) and its backward, on random images with a few boxes, masks and stuff labels,
measured by the suite's own :func:`crbp_fast.bench.memory.measure_iteration`: ``saved_for_backward``
bytes on every device (exact: what autograd keeps) and ``cuda_max_allocated`` on CUDA (the paper's
"peak memory per GPU"). Rows are :class:`crbp_fast.bench.records.Record` rows with ``channels`` =
the FPN width, ``kernel_size`` = 3 (the cell's kernels) and the model in ``note``; they go to
``benchmarks/results/panoptic/`` on request, apart from the hGRU rows that ``crbp-fast bench
plot`` draws.

Presets (:data:`~crbp_fast.tasks.panoptic.config.MEMORY_PRESETS`): ``coco`` (2 images of 800 x
1216, ResNet-50, FPN width 256: COCO's training size; a GPU) and ``cpu`` (2 images of 256 x 384,
ResNet-18, FPN width 64: the stated smaller CPU size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ...bench.memory import LossFn, iteration_rows, measure_iteration
from ...bench.records import Environment, Record
from ...hgru.backends import resolve_backend
from .config import MEMORY_PRESETS as PRESETS
from .config import MemoryPreset
from .model import PanopticConfig, PanopticFPN

DEFAULT_OUT = Path("benchmarks") / "results" / "panoptic"
NUM_THINGS, NUM_STUFF = 3, 2


def _inputs(preset: MemoryPreset, device: torch.device, seed: int) -> tuple[list, list]:
    """Random images, and per image three boxes with their masks and a two-band stuff map."""
    g = torch.Generator().manual_seed(seed)
    h, w = preset.height, preset.width
    images, targets = [], []
    for _ in range(preset.batch):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        boxes, masks = [], []
        semantic = torch.ones(h, w, dtype=torch.int64)
        semantic[h // 2:] = 2
        for _ in range(3):
            bh, bw = int(h * 0.2), int(w * 0.2)
            y0 = int(torch.randint(0, h - bh, (1,), generator=g))
            x0 = int(torch.randint(0, w - bw, (1,), generator=g))
            mask = torch.zeros(h, w, dtype=torch.uint8)
            mask[y0:y0 + bh, x0:x0 + bw] = 1
            semantic[mask.bool()] = 0
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            masks.append(mask)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                        "labels": torch.randint(1, NUM_THINGS + 1, (3,), generator=g).to(device),
                        "masks": torch.stack(masks).to(device), "semantic": semantic.to(device)})
    return images, targets


def iteration(preset: MemoryPreset, algorithm: str, steps: int, device: torch.device, seed: int = 0,
              cell_backend: str = "auto", lcp_weight: float = 1.0) -> LossFn:
    """The model and inputs of one configuration, as the forward of one training iteration
    (a :data:`crbp_fast.bench.memory.LossFn` for :func:`~crbp_fast.bench.memory.measure_iteration`)."""
    torch.manual_seed(seed)
    config = PanopticConfig(
        num_things=NUM_THINGS, num_stuff=NUM_STUFF, backbone=preset.backbone, fpn_width=preset.fpn_width,
        semantic_width=preset.semantic_width, steps=steps, algorithm=algorithm, adjoint_steps=preset.adjoint_steps,
        cell_backend=cell_backend, min_size=min(preset.height, preset.width),
        max_size=max(preset.height, preset.width), anchor_sizes=preset.anchor_sizes)
    model = PanopticFPN(config, list(range(1, NUM_THINGS + 1)), list(range(NUM_THINGS + 1, NUM_THINGS + 1 + NUM_STUFF)))
    model.to(device).train()
    images, targets = _inputs(preset, device, seed)

    def adjoint_iterations() -> int | None:
        done = [s.adjoint_iterations for s in model.fpn.level_stats if s.adjoint_iterations is not None]
        return max(done, default=None)

    def forward():
        torch.manual_seed(seed)  # the same RPN / ROI sampling in every configuration
        out = model(images, targets)
        loss = sum(out.losses.values())
        if out.penalty is not None:
            loss = loss + lcp_weight * out.penalty
        return loss, adjoint_iterations

    return forward


def measure(preset: MemoryPreset, algorithm: str, steps: int, device: torch.device, seed: int = 0,
            cell_backend: str = "auto", lcp_weight: float = 1.0) -> dict:
    """Saved-for-backward bytes (and the CUDA baseline and peak) of one training iteration."""
    saved, baseline, peak, iterations = measure_iteration(
        device, iteration(preset, algorithm, steps, device, seed, cell_backend, lcp_weight))
    return {"saved": saved, "baseline": baseline, "peak": peak, "adjoint_iterations": iterations}


def run(preset: MemoryPreset | str, device: torch.device, algorithms: dict[str, tuple[int, ...]] | None = None,
        seed: int = 0, progress: bool = True, cell_backend: str = "auto", name: str | None = None,
        emit: Callable[[list[Record]], None] | None = None) -> list[Record]:
    """The preset's rows (BPTT at its steps, C-RBP at its steps, unless ``algorithms`` says
    otherwise); each configuration's rows go to ``emit`` as soon as they are measured.
    ``preset``: a name of :data:`PRESETS` or a :class:`MemoryPreset` (then ``name`` names it)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
        preset, name = PRESETS[preset], name or preset
    algorithms = algorithms or {"bptt": preset.bptt_steps, "crbp": preset.crbp_steps}
    env = Environment.capture(device, f"panoptic-{name or 'custom'}")
    backend = resolve_backend(cell_backend, device).name
    note = (f"panoptic FPN {preset.backbone}, FPN width {preset.fpn_width}, ConvHGRU laterals, one training "
            f"iteration (Mask R-CNN + semantic losses + LCP)")
    rows: list[Record] = []
    from tqdm import tqdm

    configs = [(a, n) for a, ns in algorithms.items() for n in ns]
    for algorithm, steps in tqdm(configs, desc="panoptic memory", unit="cfg", disable=not progress):
        config = dict(suite="memory", measure="train_iteration", note=note, algorithm=algorithm, backend=backend,
                      conv="direct", steps=steps, adjoint_steps=preset.adjoint_steps, batch=preset.batch,
                      channels=preset.fpn_width, height=preset.height, width=preset.width, kernel_size=3)
        forward = iteration(preset, algorithm, steps, device, seed, backend)
        measured = iteration_rows(env, config, device, forward)
        del forward
        rows += measured
        if emit is not None:
            emit(measured)
    return rows


def table(rows: list[Record]) -> str:
    """A Markdown table of the rows: algorithm, N, MiB per measure (or why a configuration has none)."""
    lines = ["| algorithm | N | saved for backward (MiB) | CUDA max allocated (MiB) |", "| --- | --- | --- | --- |"]
    keyed: dict[tuple[str, int], dict[str, str]] = {}
    for r in rows:
        cell = keyed.setdefault((r.algorithm, r.steps), {})
        if r.status != "ok":
            cell["saved_for_backward"] = cell["cuda_max_allocated"] = r.status
        else:
            cell[r.peak_kind] = f"{r.peak_bytes / 2**20:.1f}"
    for (algorithm, steps), kinds in keyed.items():
        lines.append(f"| {algorithm} | {steps} | {kinds.get('saved_for_backward', '-')} | "
                     f"{kinds.get('cuda_max_allocated', '-')} |")
    return "\n".join(lines)


__all__ = ["DEFAULT_OUT", "PRESETS", "MemoryPreset", "iteration", "measure", "run", "table"]
