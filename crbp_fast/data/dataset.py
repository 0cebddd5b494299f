"""Pathfinder as torch Datasets: drawn on the fly by index, or read from on-disk shards.

On-disk layout (written by :func:`write_shards`, ``crbp-fast pathfinder generate``)::

    DIR/index.json                   task, length, size, seed, n, generator config, and per shard:
                                     file names, image count, byte sizes, SHA-256 of each file
    DIR/shard_00000.images.npy       uint8 (count, 1, size, size)
    DIR/shard_00000.targets.npy      uint8 masks (count, 1, size, size) or int64 labels (count,)

``index.json`` is written last, so a directory without it is an unfinished generation. Opening
checks that every shard file is there with its recorded size; a shard's checksum is verified the
first time it is read (or all at once with :meth:`ShardedPathfinder.verify`), and a mismatch is a
:class:`ShardError` naming the file. Nothing is skipped silently.

Both datasets return ``(image, target)``: image float32 (1, size, size) in [0, 1]; target int64
(size, size) of 0/1 for segmentation, an int64 scalar label for classification.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from .pathfinder import DEFAULT_CONFIG, PathfinderConfig, check_length, check_size, check_task, generate

INDEX_FILE = "index.json"
FORMAT = "crbp_fast.pathfinder/1"

#: Held-out samples are drawn from indices at and above this one, so they never meet a training index.
EVAL_INDEX_OFFSET = 1 << 40


class ShardError(ValueError):
    """A dataset directory is missing shards, has a corrupt one, or is not a Pathfinder directory."""


def _to_tensors(image: np.ndarray, target: np.ndarray | np.integer, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / 255.0)
    if task == "segmentation":
        return img, torch.from_numpy(np.ascontiguousarray(target[0], dtype=np.int64))
    return img, torch.tensor(int(target), dtype=torch.int64)


class PathfinderDataset(Dataset):
    """Samples ``start .. start + n - 1`` of the Pathfinder dataset ``seed``, drawn on demand.

    Args:
        task: ``"segmentation"`` or ``"classification"``.
        length: paddles per target contour (2..40).
        size: image side.
        seed: dataset seed.
        n: number of samples (indices ``start .. start + n - 1``).
        start: first sample index (:data:`EVAL_INDEX_OFFSET` for the held-out set).
        config: generator parameters.

    Example:
        >>> ds = PathfinderDataset("segmentation", 14, 150, seed=0, n=1000)
        >>> image, mask = ds[0]
    """

    def __init__(
        self, task: str, length: int, size: int, seed: int, n: int, start: int = 0,
        config: PathfinderConfig = DEFAULT_CONFIG,
    ):
        self.task = check_task(task)
        self.length = check_length(length)
        self.size = check_size(size)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start: expected an int >= 0, got {start!r}")
        self.seed, self.n, self.start, self.config = int(seed), n, start, config

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a dataset of {self.n} samples")
        images, targets = generate(
            1, self.task, self.length, self.size, self.seed, start=self.start + i, config=self.config)
        return _to_tensors(images[0], targets[0], self.task)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(root: str, k: int, start: int, count: int, task: str, length: int, size: int, seed: int,
                 config: PathfinderConfig) -> dict:
    """Draw and write shard ``k`` (samples ``start .. start + count - 1``); returns its index entry."""
    images, targets = generate(count, task, length, size, seed, start=start, config=config)
    entry: dict = {"count": count, "start": start, "files": {}}
    for part, array in (("images", images), ("targets", targets)):
        name = f"shard_{k:05d}.{part}.npy"
        path = Path(root) / name
        _save_npy_atomic(path, array)
        entry["files"][part] = {"name": name, "bytes": path.stat().st_size, "sha256": _sha256(path)}
    return entry


def _write_shard_star(args: tuple) -> dict:
    return _write_shard(*args)


def write_shards(
    root: str | os.PathLike, n: int, task: str = "segmentation", length: int = 14, size: int = 150, seed: int = 0,
    *, shard_size: int = 1000, workers: int = 1, config: PathfinderConfig = DEFAULT_CONFIG, progress: bool = True,
) -> Path:
    """Generate samples ``0 .. n - 1`` of dataset ``seed`` into shards under ``root``.

    Args:
        root: output directory (created; must not already hold an ``index.json``).
        n: number of samples.
        task, length, size, seed, config: as :func:`crbp_fast.data.pathfinder.generate`.
        shard_size: samples per shard.
        workers: processes drawing shards in parallel.
        progress: show a tqdm bar (images).

    Returns:
        The path of the written ``index.json``.
    """
    check_task(task)
    check_length(length)
    check_size(size)
    for arg, value, low in (("n", n, 1), ("shard_size", shard_size, 1), ("workers", workers, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg}: expected an int >= {low}, got {value!r}")
    root = Path(root)
    if (root / INDEX_FILE).exists():
        raise FileExistsError(f"{root / INDEX_FILE} already exists; choose an empty output directory")
    root.mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(root), k, start, min(shard_size, n - start), task, length, size, seed, config)
        for k, start in enumerate(range(0, n, shard_size))
    ]
    from tqdm.auto import tqdm

    bar = tqdm(total=n, unit="img", desc=f"pathfinder {task} L={length}", disable=not progress)
    entries: list[dict] = []
    if workers == 1:
        results: Iterable[dict] = map(_write_shard_star, jobs)
        for entry in results:
            entries.append(entry)
            bar.update(entry["count"])
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for entry in pool.imap(_write_shard_star, jobs):
                entries.append(entry)
                bar.update(entry["count"])
    bar.close()
    index = {
        "format": FORMAT, "task": task, "length": length, "size": size, "seed": seed, "n": n,
        "shard_size": shard_size, "config": asdict(config), "shards": entries,
    }
    tmp = root / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, root / INDEX_FILE)
    return root / INDEX_FILE


class ShardedPathfinder(Dataset):
    """A Pathfinder set written by :func:`write_shards`, read through memory maps.

    Attributes ``task``, ``length``, ``size``, ``seed``, ``n`` and ``config`` come from the
    directory's ``index.json``.

    Raises:
        ShardError: no ``index.json``, an unreadable one, a missing shard file, a file of the
            wrong size, or (when read, or on :meth:`verify`) a checksum mismatch; the message
            names the file.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not self.root.is_dir():
            raise ShardError(f"dataset directory {self.root} does not exist")
        if not index_path.exists():
            raise ShardError(
                f"{index_path} is missing: {self.root} is not a Pathfinder dataset directory, or its "
                f"generation did not finish"
            )
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ShardError(f"{index_path} is corrupt: {err}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise ShardError(f"{index_path}: format {found!r}, expected {FORMAT!r}")
        try:
            self.task = check_task(index["task"])
            self.length = check_length(index["length"])
            self.size = check_size(index["size"])
            self.seed = int(index["seed"])
            self.n = int(index["n"])
            self.config = PathfinderConfig(**index["config"])
            self._shards = index["shards"]
        except (KeyError, TypeError, ValueError) as err:
            raise ShardError(f"{index_path} is corrupt: {err!r}") from None
        missing = []
        for entry in self._shards:
            for part in ("images", "targets"):
                f = entry["files"][part]
                path = self.root / f["name"]
                if not path.exists():
                    missing.append(f["name"])
                elif path.stat().st_size != f["bytes"]:
                    raise ShardError(
                        f"shard file {path} is corrupt: {path.stat().st_size} bytes, index.json records {f['bytes']}"
                    )
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ShardError(f"{self.root}: missing shard files: {shown}")
        if sum(e["count"] for e in self._shards) != self.n:
            raise ShardError(f"{index_path} is corrupt: shard counts do not add up to n={self.n}")
        self._starts = np.cumsum([0] + [e["count"] for e in self._shards])
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return self.n

    def _load(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._arrays:
            entry = self._shards[k]
            arrays = []
            for part in ("images", "targets"):
                f = entry["files"][part]
                path = self.root / f["name"]
                if k not in self._verified and _sha256(path) != f["sha256"]:
                    raise ShardError(f"shard file {path} is corrupt: its SHA-256 does not match index.json")
                try:
                    arrays.append(np.load(path, mmap_mode="r"))
                except (ValueError, OSError) as err:
                    raise ShardError(f"shard file {path} is corrupt: {err}") from None
            images, targets = arrays
            want = (entry["count"], 1, self.size, self.size)
            if images.shape != want or images.dtype != np.uint8:
                raise ShardError(f"shard file {self.root / entry['files']['images']['name']} is corrupt: "
                                 f"{images.dtype} {images.shape}, expected uint8 {want}")
            self._arrays[k] = (images, targets)
            self._verified.add(k)
        return self._arrays[k]

    def verify(self) -> None:
        """Read every shard and check its checksum now (raises :class:`ShardError` naming the file)."""
        for k in range(len(self._shards)):
            self._load(k)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i`` as stored: uint8 image (1, size, size) and its mask or label."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a dataset of {self.n} samples")
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        images, targets = self._load(k)
        j = i - int(self._starts[k])
        return np.asarray(images[j]), np.asarray(targets[j])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.raw(i)
        return _to_tensors(image, target, self.task)

    def __getstate__(self) -> dict:
        # Memory maps are reopened in each DataLoader worker (verified shards are not hashed again).
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


__all__ = ["EVAL_INDEX_OFFSET", "INDEX_FILE", "PathfinderDataset", "ShardError", "ShardedPathfinder", "write_shards"]
