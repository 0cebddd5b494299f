"""The panoptic memory preset: C-RBP's saved-for-backward bytes flat in N, BPTT's growing."""

from __future__ import annotations

from crbp_fast.tasks.panoptic.memory import PRESETS, MemoryPreset, measure, table

import torch

TINY = MemoryPreset(batch=1, height=64, width=96, backbone="resnet18", fpn_width=16, semantic_width=16,
                    anchor_sizes=(8, 16, 32, 64, 128))


def test_crbp_flat_and_bptt_growing_for_the_whole_model():
    cpu = torch.device("cpu")
    crbp = [measure(TINY, "crbp", n, cpu, cell_backend="torch")["saved"] for n in (2, 6)]
    bptt = [measure(TINY, "bptt", n, cpu, cell_backend="torch")["saved"] for n in (1, 3)]
    # The RPN / ROI sampling follows the FPN's output, so the heads' share varies a little with N.
    assert abs(crbp[1] - crbp[0]) < 0.05 * crbp[0], crbp
    # BPTT keeps every step: two more steps cost more than C-RBP's whole variation over 4 more.
    assert bptt[1] - bptt[0] > 2 * abs(crbp[1] - crbp[0]), (bptt, crbp)


def test_presets_state_their_sizes():
    assert (PRESETS["coco"].height, PRESETS["coco"].width, PRESETS["coco"].backbone) == (800, 1216, "resnet50")
    assert PRESETS["cpu"].bptt_steps == (1, 2, 3, 4, 5) and PRESETS["cpu"].crbp_steps == (5, 10, 20)
    assert table([]).startswith("| algorithm | N |")
