"""Memory of one Panoptic FPN training iteration as N grows: BPTT against C-RBP (the paper's table).

One iteration = the forward of :class:`~crbp_fast.tasks.panoptic.model.PanopticFPN` (Mask R-CNN losses +
semantic loss + the FPN's LCP penalty) and its backward, on random images with a few boxes,
masks and stuff labels. Measured as the benchmark suite measures the hGRU
(:mod:`crbp_fast.bench.memory`): ``saved_for_backward`` bytes on every device (exact: what autograd
keeps), and ``cuda_max_allocated`` on CUDA (the paper's "peak memory per GPU"). Rows are
:class:`crbp_fast.bench.records.Record` rows with ``channels`` = the FPN width, ``kernel_size`` =
3 (the cell's kernels) and the model in ``note``; they go to ``benchmarks/results/panoptic/``, apart
from the hGRU rows that ``crbp-fast bench plot`` draws.

Presets: ``coco`` (2 images of 800 x 1216, ResNet-50, FPN width 256: COCO's training size; a GPU)
and ``cpu`` (2 images of 256 x 384, ResNet-18, FPN width 64: the stated smaller CPU size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...bench.memory import SavedTensorBytes, reset_cuda_peak
from ...bench.records import Environment, Record, append_records, records_path
from ...hgru.backends import resolve_backend
from .model import PanopticConfig, PanopticFPN

DEFAULT_OUT = Path("benchmarks") / "results" / "panoptic"
NUM_THINGS, NUM_STUFF = 3, 2


@dataclass(frozen=True)
class MemoryPreset:
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


PRESETS = {
    "coco": MemoryPreset(2, 800, 1216, "resnet50", 256, 128, (32, 64, 128, 256, 512)),
    "cpu": MemoryPreset(2, 256, 384, "resnet18", 64, 64, (16, 32, 64, 128, 256)),
}


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


def measure(preset: MemoryPreset, algorithm: str, steps: int, device: torch.device, seed: int = 0,
            cell_backend: str = "auto", lcp_weight: float = 1.0) -> dict:
    """Saved-for-backward bytes (and the CUDA peak) of one training iteration."""
    torch.manual_seed(seed)
    config = PanopticConfig(
        num_things=NUM_THINGS, num_stuff=NUM_STUFF, backbone=preset.backbone, fpn_width=preset.fpn_width,
        semantic_width=preset.semantic_width, steps=steps, algorithm=algorithm, adjoint_steps=preset.adjoint_steps,
        cell_backend=cell_backend, min_size=min(preset.height, preset.width),
        max_size=max(preset.height, preset.width), anchor_sizes=preset.anchor_sizes)
    model = PanopticFPN(config, list(range(1, NUM_THINGS + 1)), list(range(NUM_THINGS + 1, NUM_THINGS + 1 + NUM_STUFF)))
    model.to(device).train()
    images, targets = _inputs(preset, device, seed)
    cuda = device.type == "cuda"
    baseline = reset_cuda_peak(device)
    torch.manual_seed(seed)  # the same RPN / ROI sampling in every configuration
    with SavedTensorBytes() as saved:
        out = model(images, targets)
        loss = sum(out.losses.values())
        if out.penalty is not None:
            loss = loss + lcp_weight * out.penalty
    loss.backward()
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    stats = model.fpn.level_stats
    iterations = max((s.adjoint_iterations for s in stats if s.adjoint_iterations is not None), default=None)
    return {"saved": saved.total, "baseline": baseline, "peak": peak, "adjoint_iterations": iterations,
            "backend": resolve_backend(cell_backend, device).name}


def run(preset_name: str, device: torch.device, algorithms: dict[str, tuple[int, ...]] | None = None,
        seed: int = 0, progress: bool = True) -> list[Record]:
    """The preset's rows (BPTT at its steps, C-RBP at its steps, unless ``algorithms`` says otherwise)."""
    if preset_name not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset_name!r}")
    preset = PRESETS[preset_name]
    algorithms = algorithms or {"bptt": preset.bptt_steps, "crbp": preset.crbp_steps}
    env = Environment.capture(device, f"panoptic-{preset_name}")
    note = (f"panoptic FPN {preset.backbone}, FPN width {preset.fpn_width}, ConvHGRU laterals, one training "
            f"iteration (Mask R-CNN + semantic losses + LCP)")
    rows = []
    from tqdm import tqdm

    configs = [(a, n) for a, ns in algorithms.items() for n in ns]
    for algorithm, steps in tqdm(configs, desc="panoptic memory", unit="cfg", disable=not progress):
        m = measure(preset, algorithm, steps, device, seed)
        common = dict(suite="memory", measure="train_iteration", status="ok", note=note, algorithm=algorithm,
                      backend=m["backend"], conv="direct", steps=steps, adjoint_steps=preset.adjoint_steps,
                      batch=preset.batch, channels=preset.fpn_width, height=preset.height, width=preset.width,
                      kernel_size=3, adjoint_iterations=m["adjoint_iterations"])
        rows.append(env.record(**common, peak_kind="saved_for_backward", peak_bytes=m["saved"]))
        if m["peak"] is not None:
            rows.append(env.record(**common, peak_kind="cuda_max_allocated", peak_bytes=m["peak"],
                                   baseline_bytes=m["baseline"]))
    return rows


def table(rows: list[Record]) -> str:
    """A Markdown table of the rows: algorithm, N, MiB per measure."""
    lines = ["| algorithm | N | saved for backward (MiB) | CUDA max allocated (MiB) |", "| --- | --- | --- | --- |"]
    keyed: dict[tuple[str, int], dict[str, int]] = {}
    for r in rows:
        keyed.setdefault((r.algorithm, r.steps), {})[r.peak_kind] = r.peak_bytes
    for (algorithm, steps), kinds in keyed.items():
        cuda = kinds.get("cuda_max_allocated")
        lines.append(f"| {algorithm} | {steps} | {kinds['saved_for_backward'] / 2**20:.1f} | "
                     f"{cuda / 2**20:.1f} |" if cuda is not None else
                     f"| {algorithm} | {steps} | {kinds['saved_for_backward'] / 2**20:.1f} | - |")
    return "\n".join(lines)


def write(rows: list[Record], out: Path = DEFAULT_OUT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = records_path(out, rows[0].device_name)
    append_records(path, rows)
    return path


__all__ = ["DEFAULT_OUT", "PRESETS", "MemoryPreset", "measure", "run", "table", "write"]
