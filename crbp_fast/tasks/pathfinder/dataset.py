"""Pathfinder as torch Datasets: drawn on the fly by index, or read from on-disk shards.

On-disk layout (written by :func:`write_shards`, ``crbp-fast pathfinder generate``)::

    DIR/index.json                   task, length, size, seed, n, generator config, and per shard:
                                     file names, image count, byte sizes, SHA-256 of each file
    DIR/shard_00000.images.npy       uint8 (count, 1, size, size)
    DIR/shard_00000.targets.npy      uint8 masks (count, 1, size, size) or int64 labels (count,)

``index.json`` is written last, so a directory without it is an unfinished generation. Opening
checks that ``index.json`` is well formed (every shard a plain file name inside the directory)
and that every shard file is there with its recorded size; a shard's checksum, array shape, dtype
and target values are verified the first time it is read (or all at once with
:meth:`ShardedPathfinder.verify`), every later read checks the file was not changed since, and
a mismatch is a :class:`ShardError` naming the file. Nothing is skipped silently.

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

from .generator import DEFAULT_CONFIG, PathfinderConfig, check_length, check_size, check_task, generate

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
        task, length, size, seed, config: as :func:`crbp_fast.tasks.pathfinder.generator.generate`.
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


_HEX = frozenset("0123456789abcdef")


def _index_error(index_path: Path, what: str) -> ShardError:
    return ShardError(f"{index_path} is malformed: {what}")


def _index_int(index_path: Path, where: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _index_error(index_path, f"{where} is {value!r}, expected an int >= {low}")
    return value


def _shard_file(root: Path, index_path: Path, where: str, f: object) -> dict:
    """One ``files`` entry of index.json, checked: a plain file name inside ``root``, bytes, SHA-256."""
    if not isinstance(f, dict):
        raise _index_error(index_path, f"{where} is {type(f).__name__}, expected an object with name, bytes, sha256")
    name = f.get("name")
    # A name is a file in the data directory, never a path: "../x", "/etc/x" or "a/b" would make
    # the loader open files the directory does not own.
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise _index_error(index_path, f"{where}.name is {name!r}, expected a file name inside {root}")
    path = root / name
    if path.exists() and path.resolve().parent != root.resolve():
        raise _index_error(index_path, f"{where}.name {name!r} is a link out of {root}, expected a plain file")
    _index_int(index_path, f"{where}.bytes", f.get("bytes"), 0)
    digest = f.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        raise _index_error(index_path, f"{where}.sha256 is {digest!r}, expected 64 lowercase hex digits")
    return f


def _parse_index(root: Path, index_path: Path, index: dict) -> list[dict]:
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        raise _index_error(index_path, f"'shards' is {type(shards).__name__ if shards is not None else 'missing'}, "
                                       f"expected a non-empty list")
    for k, entry in enumerate(shards):
        where = f"shards[{k}]"
        if not isinstance(entry, dict):
            raise _index_error(index_path, f"{where} is {type(entry).__name__}, expected an object")
        _index_int(index_path, f"{where}.count", entry.get("count"), 1)
        files = entry.get("files")
        if not isinstance(files, dict) or set(files) != {"images", "targets"}:
            found = sorted(files) if isinstance(files, dict) else (type(files).__name__ if files is not None else "missing")
            raise _index_error(index_path, f"{where}.files is {found}, expected an object with 'images' and 'targets'")
        for part in ("images", "targets"):
            _shard_file(root, index_path, f"{where}.files.{part}", files[part])
    return shards


def _npy_array(path: Path, data: bytes) -> tuple[np.ndarray, int]:
    """Parse a whole .npy file held in memory; returns the array (a view of ``data``) and its data offset."""
    import io

    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"npy format version {version}, expected 1.0 or 2.0")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(buf)
    except (ValueError, OSError, SyntaxError) as err:
        raise ShardError(f"shard file {path} is corrupt: {err}") from None
    offset = buf.tell()
    if fortran or dtype.hasobject:
        raise ShardError(f"shard file {path} is corrupt: {'Fortran order' if fortran else 'object dtype'}, "
                         f"expected a C-ordered numeric array")
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != want:
        raise ShardError(f"shard file {path} is corrupt: {len(data)} bytes, its header describes {want}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape), offset


class ShardedPathfinder(Dataset):
    """A Pathfinder set written by :func:`write_shards`.

    Attributes ``task``, ``length``, ``size``, ``seed``, ``n`` and ``config`` come from the
    directory's ``index.json``.

    Samples are read with plain positioned reads (``os.pread``), not memory maps: a shard file
    truncated under a memory map kills the process with SIGBUS, while a short read is an error
    that names the file. Each shard is verified once per process (size, SHA-256, array shape,
    dtype and target values); afterwards every read checks that the file's size and
    modification time are the ones verified, so a file changed in place while training is an
    error, not silently different data.

    Raises:
        ShardError: no ``index.json``, a malformed one (missing or mistyped fields, a shard
            named outside the directory), a missing shard file, a file of the wrong size, or
            (when read, or on :meth:`verify`) a checksum mismatch, arrays of the wrong shape or
            dtype, targets other than 0 / 1, or a file changed since it was verified; the
            message names the file.
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
            text = index_path.read_text()
            index = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ShardError(f"{index_path} is corrupt: {err}") from None
        except OSError as err:
            raise ShardError(f"{index_path} cannot be read: {err.strerror}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise ShardError(f"{index_path}: format {found!r}, expected {FORMAT!r}")
        try:
            self.task = check_task(index["task"])
            self.length = check_length(index["length"])
            self.size = check_size(index["size"])
            self.seed = _index_int(index_path, "'seed'", index["seed"], 0)
            self.n = _index_int(index_path, "'n'", index["n"], 1)
            if not isinstance(index["config"], dict):
                raise TypeError(f"'config' is {type(index['config']).__name__}, expected an object")
            self.config = PathfinderConfig(**index["config"])
        except KeyError as err:
            raise ShardError(f"{index_path} is malformed: {err} is missing") from None
        except (TypeError, ValueError) as err:
            raise ShardError(f"{index_path} is malformed: {err}") from None
        self._shards = _parse_index(self.root, index_path, index)
        self._index_sha256 = hashlib.sha256(text.encode()).hexdigest()
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
        # Per (shard, part), once verified: (data offset, bytes per sample, dtype, sample shape,
        # (size, mtime_ns) as verified). File descriptors are per process (see __getstate__).
        self._layout: dict[tuple[int, str], tuple] = {}
        self._fds: dict[tuple[int, str], int] = {}

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> dict:
        """What this data is, for a checkpoint: the generation parameters and a digest of the content.

        The digest is over the shards' SHA-256 values in order, so a moved or copied directory
        has the same fingerprint and another generation (another n, seed or content) does not.
        """
        content = hashlib.sha256("".join(
            e["files"][p]["sha256"] for e in self._shards for p in ("images", "targets")).encode()).hexdigest()
        return {"source": "shards", "task": self.task, "length": self.length, "size": self.size, "seed": self.seed,
                "n": self.n, "generator": asdict(self.config), "content_sha256": content}

    def _expected(self, k: int, part: str) -> tuple[tuple[int, ...], tuple[np.dtype, ...]]:
        count = self._shards[k]["count"]
        if part == "images" or self.task == "segmentation":
            return (count, 1, self.size, self.size), (np.dtype(np.uint8),)
        return (count,), (np.dtype(np.int64),)

    def _fd(self, key: tuple[int, str], path: Path) -> int:
        if key not in self._fds:
            try:
                self._fds[key] = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise ShardError(f"shard file {path} cannot be opened: {err.strerror}") from None
        return self._fds[key]

    def _verify_part(self, k: int, part: str) -> None:
        f = self._shards[k]["files"][part]
        path = self.root / f["name"]
        fd = self._fd((k, part), path)
        before = os.fstat(fd)
        data = b"".join(iter(lambda: os.read(fd, 1 << 22), b""))
        os.lseek(fd, 0, os.SEEK_SET)
        after = os.fstat(fd)
        if len(data) != f["bytes"] or (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise ShardError(f"shard file {path} is corrupt: {len(data)} bytes read, index.json records {f['bytes']} "
                             f"(was it changed while being read?)")
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise ShardError(f"shard file {path} is corrupt: its SHA-256 does not match index.json")
        array, offset = _npy_array(path, data)
        shape, dtypes = self._expected(k, part)
        if array.shape != shape or array.dtype not in dtypes:
            raise ShardError(f"shard file {path} holds {array.dtype} {array.shape}, expected "
                             f"{' or '.join(map(str, dtypes))} {shape}")
        if part == "targets" and array.size and (int(array.min()) < 0 or int(array.max()) > 1):
            kind = "mask" if self.task == "segmentation" else "label"
            raise ShardError(f"shard file {path} holds {kind} values in [{int(array.min())}, {int(array.max())}], "
                             f"expected 0 or 1")
        per_sample = int(np.prod(shape[1:], dtype=np.int64)) * array.dtype.itemsize
        self._layout[(k, part)] = (offset, per_sample, array.dtype, shape[1:], (after.st_size, after.st_mtime_ns))

    def _read(self, k: int, part: str, j: int) -> np.ndarray:
        if (k, part) not in self._layout:
            self._verify_part(k, part)
        offset, per_sample, dtype, sample_shape, verified = self._layout[(k, part)]
        path = self.root / self._shards[k]["files"][part]["name"]
        fd = self._fd((k, part), path)
        data = os.pread(fd, per_sample, offset + j * per_sample)
        st = os.fstat(fd)
        if len(data) != per_sample or (st.st_size, st.st_mtime_ns) != verified:
            raise ShardError(
                f"shard file {path} changed since it was verified ({verified[0]} bytes then, {st.st_size} now); "
                f"a dataset must not be rewritten while it is read: regenerate it and start again"
            )
        return np.frombuffer(data, dtype=dtype).reshape(sample_shape)

    def verify(self) -> None:
        """Read every shard and check it now (raises :class:`ShardError` naming the file)."""
        for k in range(len(self._shards)):
            for part in ("images", "targets"):
                if (k, part) not in self._layout:
                    self._verify_part(k, part)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i`` as stored: uint8 image (1, size, size) and its mask or label."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a dataset of {self.n} samples")
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = i - int(self._starts[k])
        return self._read(k, "images", j), self._read(k, "targets", j)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.raw(i)
        return _to_tensors(image, target, self.task)

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next read)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    def __getstate__(self) -> dict:
        # File descriptors belong to a process: each DataLoader worker opens its own; the verified
        # layouts travel, so shards are not hashed again there.
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state


__all__ = ["EVAL_INDEX_OFFSET", "INDEX_FILE", "PathfinderDataset", "ShardError", "ShardedPathfinder", "write_shards"]
