"""Benchmark records: one JSON-lines row per measurement, validated before it is written.

A row says what was measured (``suite``, ``measure``), on what (device, versions, commit), at
which configuration (shape, algorithm, backend, conv engine, N, adjoint steps) and the result
(peak bytes and their kind, or median / 20% / 80% seconds and images per second). A CUDA row
also says which float32 math it ran under (``tf32_matmul``, ``tf32_cudnn``: whether matmuls and
cuDNN convolutions were allowed TF32), so that engines are compared at equal precision. Rows of
a device go to ``<out>/<device-slug>.jsonl``; :func:`append_records` validates every row first
and then replaces the file in one step. The suites append each configuration's rows as soon as
they are measured, so a run that fails or is killed keeps every row it finished, and no row is
ever half-written.

Schema 2 added the TF32 fields; schema-1 rows (all from CPU runs) are read with them unknown.
"""

from __future__ import annotations

import datetime
import fcntl
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..engine.fixed_point import ALGORITHMS

SCHEMA_VERSION = 2
SUITES = ("memory", "speed", "phases")
#: memory: one training iteration; speed: a no-grad step, one adjoint VJP, one training
#: iteration, and a torch.compile'd reference step; phases: one row per phase of a training
#: iteration (crbp_fast.bench.phases), with the modelled bytes and flops of its roofline.
MEASURES = ("train_iteration", "step", "elementwise", "vjp", "compiled_step", "train_phase")
PHASE_NAMES = ("forward", "penalty", "adjoint", "final_backward")
#: Fields added after rows were first stored: a row without them reads them as None.
_ADDED_FIELDS = ("phase", "bytes_moved", "flops")
STATUSES = ("ok", "unavailable", "out_of_memory")
PEAK_KINDS = ("saved_for_backward", "rss", "cuda_max_allocated")
DEVICE_TYPES = ("cpu", "cuda")

_CHOICES = {
    "suite": SUITES, "measure": MEASURES, "status": STATUSES, "peak_kind": PEAK_KINDS,
    "device_type": DEVICE_TYPES, "algorithm": ALGORITHMS, "phase": PHASE_NAMES,
}
_POSITIVE = ("threads", "batch", "channels", "height", "width", "kernel_size", "steps", "repeats")
_NON_NEGATIVE = ("adjoint_steps", "adjoint_iterations", "peak_bytes", "baseline_bytes", "bytes_moved", "flops")
_SECONDS = ("median_s", "p20_s", "p80_s")
_TIMING = ("repeats", *_SECONDS, "images_per_s")
_PEAK = ("peak_bytes", "peak_kind")


class RecordError(ValueError):
    """A row that does not follow the schema (names the field, the value and what is expected)."""


@dataclass(frozen=True)
class Record:
    """One measurement. Construction validates it (:meth:`validate`)."""

    schema: int
    run_id: str  # shared by every row of one ``crbp-fast bench`` invocation
    timestamp: str  # ISO 8601, UTC, when the run started
    suite: str
    measure: str
    status: str
    note: str  # why a configuration was not measured; extra context otherwise
    preset: str  # "quick" or "paper": the preset the options started from
    device_type: str
    device_name: str
    threads: int  # torch.get_num_threads() during the measurement
    tf32_matmul: bool | None  # CUDA: torch.backends.cuda.matmul.allow_tf32 (None on CPU)
    tf32_cudnn: bool | None  # CUDA: torch.backends.cudnn.allow_tf32 (None on CPU)
    dtype: str
    torch_version: str
    triton_version: str | None
    python_version: str
    git_commit: str | None
    git_dirty: bool | None
    batch: int
    channels: int
    height: int
    width: int
    kernel_size: int
    algorithm: str | None  # train_iteration rows only
    backend: str  # the backend that ran (never "auto")
    conv: str  # the conv engine that ran (never "auto")
    steps: int | None  # N, the forward steps of a training iteration
    adjoint_steps: int | None
    adjoint_iterations: int | None  # J^T v products the last backward ran (rbp / crbp)
    peak_bytes: int | None
    baseline_bytes: int | None  # rss: the child after imports and set-up; cuda: allocated before
    peak_kind: str | None
    repeats: int | None
    median_s: float | None
    p20_s: float | None
    p80_s: float | None
    images_per_s: float | None
    phase: str | None = None  # train_phase rows only
    bytes_moved: int | None = None  # train_phase: modelled bytes of the phase (its roofline)
    flops: int | None = None  # train_phase: modelled flops of the phase

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`RecordError` unless every field has its type and the row is consistent."""
        hints = typing.get_type_hints(Record)
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if self.schema != SCHEMA_VERSION:
            raise RecordError(f"schema: expected {SCHEMA_VERSION}, got {self.schema!r}")
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise RecordError(f"{name}: expected one of {choices}, got {value!r}")
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecordError(f"{name}: expected an int >= 1, got {value!r}")
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise RecordError(f"{name}: expected an int >= 0, got {value!r}")
        for name in (*_SECONDS, "images_per_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise RecordError(f"{name}: expected a finite number > 0, got {value!r}")
        for name in ("run_id", "timestamp", "device_name", "backend", "conv", "dtype", "torch_version"):
            if not getattr(self, name):
                raise RecordError(f"{name}: expected a non-empty string, got {getattr(self, name)!r}")
        if "auto" in (self.backend, self.conv):
            raise RecordError(f"backend/conv: expected the engine that ran, got {self.backend!r}/{self.conv!r}")
        try:
            datetime.datetime.fromisoformat(self.timestamp)
        except ValueError:
            raise RecordError(f"timestamp: expected ISO 8601, got {self.timestamp!r}") from None
        self._check_consistency()

    def _check_consistency(self) -> None:
        cuda = self.device_type == "cuda"
        for name in ("tf32_matmul", "tf32_cudnn"):
            value = getattr(self, name)
            if cuda and value is None:
                raise RecordError(f"{name}: a CUDA row must say whether TF32 was allowed, got None")
            if not cuda and value is not None:
                raise RecordError(f"{name}: expected None on {self.device_type!r}, got {value!r}")
        train = self.measure in ("train_iteration", "train_phase")
        phased = self.measure == "train_phase"
        if (self.suite == "phases") != phased:
            raise RecordError(f"measure: the phases suite measures 'train_phase' (only), got {self.measure!r} "
                              f"in suite {self.suite!r}")
        for name in ("phase", "bytes_moved", "flops"):
            if phased and getattr(self, name) is None:
                raise RecordError(f"{name}: a train_phase row needs it, got None")
            if not phased and getattr(self, name) is not None:
                raise RecordError(f"{name}: expected None for measure {self.measure!r}, got {getattr(self, name)!r}")
        for name in ("algorithm", "steps", "adjoint_steps"):
            if train and getattr(self, name) is None:
                raise RecordError(f"{name}: a train_iteration row needs it, got None")
            if not train and getattr(self, name) is not None:
                raise RecordError(f"{name}: expected None for measure {self.measure!r}, got {getattr(self, name)!r}")
        if self.suite == "memory" and not train:
            raise RecordError(f"measure: the memory suite measures 'train_iteration', got {self.measure!r}")
        if self.status != "ok":
            if not self.note:
                raise RecordError(f"note: a row with status {self.status!r} needs the reason, got ''")
            measured = [n for n in (*_TIMING, *_PEAK, "baseline_bytes") if getattr(self, n) is not None]
            if measured:
                raise RecordError(f"{measured[0]}: expected None for status {self.status!r}")
            return
        expected, absent = (_PEAK, _TIMING) if self.suite == "memory" else (_TIMING, (*_PEAK, "baseline_bytes"))
        for name in expected:
            if getattr(self, name) is None:
                raise RecordError(f"{name}: a measured {self.suite} row needs it, got None")
        for name in absent:
            if getattr(self, name) is not None:
                raise RecordError(f"{name}: expected None in a {self.suite} row, got {getattr(self, name)!r}")
        if self.suite == "memory" and self.peak_kind != "saved_for_backward" and self.baseline_bytes is None:
            raise RecordError(f"baseline_bytes: a {self.peak_kind!r} row needs it, got None")
        if self.suite != "memory" and not self.p20_s <= self.median_s <= self.p80_s:
            raise RecordError(
                f"median_s: expected p20_s <= median_s <= p80_s, got {self.p20_s!r}, {self.median_s!r}, {self.p80_s!r}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        """A record from a parsed JSON row; unknown or missing keys are errors."""
        if not isinstance(data, dict):
            raise RecordError(f"row: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") == 1 and "tf32_matmul" not in data and "tf32_cudnn" not in data:
            data = {**data, "schema": SCHEMA_VERSION, "tf32_matmul": None, "tf32_cudnn": None}
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown:
            raise RecordError(f"row: unknown fields {unknown}")
        missing = [n for n in missing if n not in _ADDED_FIELDS]
        if missing:
            raise RecordError(f"row: missing fields {missing}")
        return cls(**data)

    @property
    def shape_id(self) -> str:
        return f"B{self.batch}-C{self.channels}-H{self.height}-W{self.width}-k{self.kernel_size}"


def _check_type(name: str, value: object, hint: object) -> None:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) not in allowed:
            raise RecordError(f"{name}: expected a value, got None")
        return
    for typ in allowed:
        if typ is type(None):
            continue
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if typ is int and isinstance(value, bool):
            continue
        if isinstance(value, typ):
            return
    expected = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise RecordError(f"{name}: expected {expected}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Where a run happens


@dataclass(frozen=True)
class Environment:
    """What every row of a run shares: ids, device, versions, commit."""

    run_id: str
    timestamp: str
    preset: str
    device_type: str
    device_name: str
    threads: int
    tf32_matmul: bool | None
    tf32_cudnn: bool | None
    torch_version: str
    triton_version: str | None
    python_version: str
    git_commit: str | None
    git_dirty: bool | None

    @classmethod
    def capture(cls, device: torch.device, preset: str) -> Environment:
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        commit, dirty = git_state()
        cuda = device.type == "cuda"
        return cls(
            run_id=f"{now.strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}", timestamp=now.isoformat(),
            preset=preset, device_type=device.type, device_name=device_name(device),
            threads=torch.get_num_threads(),
            tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
            tf32_cudnn=bool(torch.backends.cudnn.allow_tf32) if cuda else None,
            torch_version=torch.__version__,
            triton_version=package_version("triton"), python_version=platform.python_version(),
            git_commit=commit, git_dirty=dirty,
        )

    def record(self, **values) -> Record:
        """A validated row of this run; ``values`` gives the measurement's own fields."""
        base = {f.name: None for f in fields(Record)}
        base.update(schema=SCHEMA_VERSION, note="", dtype="float32", **asdict(self))
        base.update(values)
        return Record(**base)

    @property
    def slug(self) -> str:
        return device_slug(self.device_name)


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (the records file's name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the package runs from; (None, None) outside git."""
    src = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=src, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


# --------------------------------------------------------------------------------------------
# Files


def records_path(out_dir: Path, device_name_: str) -> Path:
    return Path(out_dir) / f"{device_slug(device_name_)}.jsonl"


def append_records(path: Path, rows: list[Record]) -> None:
    """Append ``rows`` to ``path`` all at once: validate all, write a copy, replace the file."""
    for row in rows:
        row.validate()
    path = Path(path)
    # Two runs appending to one device file at once must not lose each other's rows: the
    # read-copy-replace below runs under an exclusive lock on the records directory.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        _append_locked(path, rows)
    finally:
        os.close(dir_fd)


def _append_locked(path: Path, rows: list[Record]) -> None:
    existing = path.read_bytes() if path.exists() else b""
    if existing and not existing.endswith(b"\n"):
        existing += b"\n"
    payload = existing + "".join(row.to_json() + "\n" for row in rows).encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_records(path: Path) -> list[Record]:
    """Every row of a records file; a malformed row raises :class:`RecordError` naming its line."""
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                # e.g. a PNG given where the records belong
                raise RecordError(f"{path}:{lineno}: not text (expected UTF-8 JSON lines of benchmark records)") from None
            if not line.strip():
                continue
            try:
                rows.append(Record.from_dict(json.loads(line)))
            except (json.JSONDecodeError, RecordError, TypeError) as err:
                raise RecordError(f"{path}:{lineno}: {err}") from None
    return rows


__all__ = [
    "DEVICE_TYPES", "Environment", "MEASURES", "PEAK_KINDS", "Record", "RecordError", "SCHEMA_VERSION",
    "STATUSES", "SUITES", "append_records", "cpu_model_name", "device_name", "device_slug", "git_state",
    "package_version", "read_records", "records_path",
]
