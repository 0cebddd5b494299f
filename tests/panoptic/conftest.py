"""Fixtures of the torchvision tests: a small synthetic COCO-panoptic dataset, shared per session."""

from __future__ import annotations

import pytest
import torch
import torchvision  # noqa: F401  (fails the run loudly where torchvision is missing: no silent skip)

from crbp_fast.tasks.panoptic.data import write_synthetic


@pytest.fixture(autouse=True)
def _few_threads():
    # The CI machines have 2 cores shared with other jobs; the models here are small.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def panoptic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_panoptic")
    write_synthetic(root, "train", 16, size=64, seed=0)
    write_synthetic(root, "val", 4, size=64, seed=0)
    return root
