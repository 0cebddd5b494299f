"""What a training run of any task does with its output folder, its processes and its data order.

Shared by the Pathfinder trainer (:mod:`.pathfinder.train`) and the panoptic one
(:mod:`.panoptic.train`): the errors they raise, atomic writes (a kill never leaves half a
checkpoint), the exclusive lock on ``OUT/.lock`` and the removal of a killed run's temporaries,
exact-resume helpers (RNG states, a step-indexed batch order, log truncation, the data fingerprint
check), torchrun / DDP set-up and the SIGINT / SIGTERM stop flag.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

LOCK_FILE = ".lock"


class ConfigError(ValueError):
    """A training configuration out of range or inconsistent with its data (the message names the field)."""


class Interrupted(Exception):
    """Training stopped on request (SIGINT / SIGTERM) after a checkpoint of the finished steps."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class CheckpointError(ValueError):
    """A checkpoint that does not fit: another format, another model shape, another run's config."""


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    initialised_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """This process's rank, world size and device from torchrun's variables; joins the process group
    (nccl on CUDA, gloo on CPU) when the world is larger than one. ``device``: auto, cpu or cuda."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device")
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    initialised = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", rank=rank, world_size=world)
        initialised = True
    return Dist(rank, world, device, initialised)


class StepBatches(Sampler[list[int]]):
    """The dataset indices of this rank for steps ``start .. stop - 1``.

    A step's global batch is ``batch_size * world`` indices: consecutive fresh indices for an
    unbounded on-the-fly set, or a slice of a per-epoch permutation (seeded by seed and epoch) of a
    finite set of ``n``; rank r takes every world-th index from r, as DistributedSampler does.
    """

    def __init__(self, start: int, stop: int, batch_size: int, rank: int, world: int, n: int | None, seed: int):
        self.start, self.stop, self.batch, self.rank, self.world, self.n, self.seed = (
            start, stop, batch_size, rank, world, n, seed)

    def global_batch(self, step: int) -> list[int]:
        g = self.batch * self.world
        if self.n is None:
            return list(range(step * g, (step + 1) * g))
        per_epoch = self.n // g
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return perm[pos * g:(pos + 1) * g].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.global_batch(step)[self.rank::self.world]

    def __len__(self) -> int:
        return self.stop - self.start


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class OutputLock:
    """An exclusive ``flock`` on ``OUT/.lock`` for the life of a run (rank 0 only).

    Two runs writing one folder end with one run's checkpoint beside the other's log and config,
    so the second is refused. The kernel drops the lock when the holder exits, however it exits
    (a SIGKILL included), so a stale lock file never blocks a later run.
    """

    def __init__(self, out: Path):
        import fcntl

        self.path = out / LOCK_FILE
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            raise ConfigError(f"out: {out} is a file, expected a directory (or a path to create one)") from None
        except NotADirectoryError:
            raise ConfigError(f"out: {out} is inside a file, expected a directory (or a path to create one)") from None
        except OSError as err:
            raise ConfigError(f"out: cannot write to {out}: {err.strerror}; choose a writable --out") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise ConfigError(
                f"out: {out} is in use by another training run (pid {holder}); wait for it to finish or choose "
                f"another --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a new run)


def remove_stale_temporaries(out: Path, names: Iterable[str]) -> None:
    """Delete ``.checkpoint.pt.tmpPID``-style files a killed run left (the lock says none is being written)."""
    for name in names:
        for tmp in out.glob(f".{name}.tmp*"):
            if tmp.name[len(name) + 5:].isdigit():
                tmp.unlink(missing_ok=True)


def check_same_data(saved: dict | None, now: dict, path: Path, describe: Callable[[dict], str]) -> None:
    """Refuse to resume on data other than the checkpoint's (fingerprints ``saved`` and ``now``), naming both."""
    if saved is None:  # a checkpoint from before fingerprints: nothing to compare
        return
    if saved != now:
        diff = ", ".join(k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
        raise CheckpointError(
            f"{path}: the checkpoint was trained on {describe(saved)}, but this run's data is "
            f"{describe(now)} (they differ in: {diff}); a resumed run is exact only on the same data: "
            f"resume with the same data or choose another --out"
        )


def atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written after the last checkpoint by an interrupted run)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


class StopFlag:
    """Set by SIGINT / SIGTERM; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def restore(ckpt_path: Path, resume: bool, read: Callable[[Path], dict], check: Callable[[dict], None],
            optimizer: torch.optim.Optimizer) -> tuple[dict | None, int, float]:
    """Start fresh, or continue the run whose checkpoint is ``ckpt_path``.

    No checkpoint: ``(None, 0, 0.0)``. A checkpoint without ``resume``: refused (a run never
    overwrites another's checkpoint). Otherwise ``read(path)`` loads it, ``check(ckpt)`` (the
    task's: model state, resumable config, data fingerprint) raises on anything that would make
    the continuation inexact, then the optimizer and RNG states are restored; returns
    ``(ckpt, step, elapsed seconds)``.
    """
    if not ckpt_path.exists():
        return None, 0, 0.0
    if not resume:
        raise CheckpointError(f"{ckpt_path} exists; pass --resume to continue it, or choose another --out")
    ckpt = read(ckpt_path)
    check(ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return ckpt, int(ckpt["step"]), float(ckpt["elapsed"])


class RunLog:
    """The JSON-lines log of a run, from step ``start`` on (records past it, written after the
    last checkpoint by an interrupted run, are dropped first), and its ``config`` file, written
    atomically. Only the main process writes: elsewhere :meth:`write` does nothing."""

    def __init__(self, out: Path, log_file: str, config_file: str, config: dict, start: int, is_main: bool):
        self._file = None
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            truncate_log(out / log_file, start)
            atomic_write_text(out / config_file, json.dumps(config, indent=1) + "\n")
            self._file = open(out / log_file, "a")

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@contextmanager
def process(device: str, threads: int | None) -> Iterator[Dist]:
    """This process's part of a run: its :class:`Dist` (torchrun's variables; the process group
    joined when the world is larger than one, and left at the end) and ``threads`` CPU threads
    (0 / None: as set) for the run, restored afterwards."""
    env = setup_distributed(device)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield env
        if env.initialised_here:
            # Every rank done before any leaves (not after an error: the peer may be gone): gloo
            # aborts a process (std::terminate) when its peer tears the group down under its last
            # collective's connections.
            dist.barrier()
    finally:
        torch.set_num_threads(before)
        if env.initialised_here:
            dist.destroy_process_group()


@contextmanager
def output_folder(out: Path, names: Iterable[str], is_main: bool) -> Iterator[None]:
    """One run per output folder: the main process holds ``OUT/.lock`` (:class:`OutputLock`)
    for the whole run and first removes the temporaries of ``names`` that a killed run left."""
    lock = OutputLock(out) if is_main else None
    try:
        if lock is not None:
            remove_stale_temporaries(out, names)
        yield
    finally:
        if lock is not None:
            lock.release()


def reduce_step(terms: list[torch.Tensor], stop_requested: bool, env: Dist) -> tuple[torch.Tensor, bool]:
    """This step's logged scalars averaged over the ranks (float64), and whether any rank was asked
    to stop, in one collective per step (none on one process)."""
    reduced = torch.stack([*terms, torch.tensor(float(stop_requested), device=env.device)]).double()
    if env.world > 1:
        dist.all_reduce(reduced)
        reduced[:-1] /= env.world
    return reduced[:-1], bool(reduced[-1] > 0)

