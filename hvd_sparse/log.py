"""Per-trial HDF5 logs: written by rank 0, readable at any time, even while the run goes on.

Every change (an evaluation appended, the final status) is made to an in-memory image of the file,
which is written to a temporary file, fsynced and renamed over the log, so the file on disk is
always a complete, consistent HDF5 file: the old version or the new one. A run killed at any moment
leaves every flushed measurement readable, and a write that fails (disk full, quota, I/O error)
raises StorageError and leaves the previous version in place: a trial is never recorded as ended
unless that record reached the disk. Schema (documented in docs/reference/log-schema.md):

  attrs: config (JSON), run_hash, status, steps_to_result (-1 if not reached), world_size,
         mask_sha256, mask_density, hvd_sparse_version, torch_version, horovod_version,
         created, finished; a CAPPED trial: capping_bound, capped_by (hvd_sparse.capping);
         reopened_from: CAPPED when a study without capping resumed it
  measurements/<column>  1-D datasets, one entry per evaluation (see COLUMNS)
  <measurement>/step,... a measurement's own table (``append_table``), one row per measurement:
                         lipschitz/step, value, per_gamma (--lipschitz-every; absent if never
                         measured): its step, the largest L_g, and every L_g (attr ``gammas``)
  mask/<param name>      np.packbits of the flattened boolean mask, attr ``shape``
                         (attr mask_names lists them in model order; read_log returns a Mask)
  user block (512 bytes) "hvd_sparse log sha256 <hex>": the SHA-256 of the rest of the file, set at
                         every write and checked before HDF5 reads anything (``verified_bytes``)
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import h5py
import numpy as np

from hvd_sparse.mask import Mask

COLUMNS: dict[str, type] = {
    "step": np.int64,
    "val_error": np.float64,
    "val_loss": np.float64,
    "train_loss": np.float64,
    "wall_time": np.float64,
    "allreduce_bytes": np.int64,  # cumulative payload of the gradient allreduces up to this step
    "noise_scale": np.float64,  # B_simple = tr(Sigma) / |G|^2, smoothed (NaN when not measured)
    "grad_sq": np.float64,  # the smoothed |G|^2 estimate behind it
    "grad_trace": np.float64,  # the smoothed tr(Sigma) estimate behind it
}
OPTIONAL_COLUMNS = ("noise_scale", "grad_sq", "grad_trace")  # NaN in a row that does not have them
RESERVED_GROUPS = ("measurements", "mask")  # the other groups of a log are measurement tables (``append_table``)
STATUSES = ("RUNNING", "COMPLETE", "INCOMPLETE", "INFEASIBLE", "CAPPED")
CAPPING_ATTRS = ("capping_bound", "capped_by")  # a CAPPED trial's bound (steps) and the trial that set it
REQUIRED_ATTRS = (
    "config", "run_hash", "status", "steps_to_result", "world_size", "mask_sha256",
    "hvd_sparse_version", "torch_version", "horovod_version",
)


class LogError(ValueError):
    """A log file that cannot be created, appended to, or read."""


class StorageError(RuntimeError):
    """A log, checkpoint or model file could not be written (disk full, quota, I/O error). The file
    on disk is still its previous, consistent version; the run stops on every rank (exit 1)."""


def _reason(error: BaseException, folder: Path | None = None) -> str:
    """One line for a failed write: the OS error's own words, else the first line of the message;
    a write that failed on a full filesystem says so, whatever the writer's words (torch.save's are
    "unexpected pos ..." with the OSError lost)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if folder is not None and _is_full(folder):
        return os.strerror(errno.ENOSPC)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a full disk or an exhausted quota: not the path's fault, a rerun works later


def unwritable(e: OSError, message: str, otherwise: type[Exception] | None = None) -> Exception:
    """The error for a path that could not be written: StorageError (exit 1, a runtime failure: rerun
    once there is room) for a full disk or quota, else ``otherwise`` (default LogError; exit 2: fix the path)."""
    return StorageError(message) if e.errno in NO_ROOM else (otherwise or LogError)(message)


def _is_full(folder: Path) -> bool:
    """No room for another filesystem block (what a full disk or an exhausted quota leaves)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < stats.f_bsize


def write_atomically(path: Path, write: Callable[[Path], None], what: str) -> None:
    """``write(tmp)``, fsync, rename over ``path``: readers and a crash see the old file or the new one.

    Any failure removes the temporary file and raises StorageError; ``path`` is left as it was.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # delayed-allocation filesystems report a full disk here, not at write()
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError for a failed write
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{path}: cannot write the {what}: {_reason(e, path.parent)}{_free_space(path.parent)}") from None


# Every log starts with a user block HDF5 leaves alone: this line, the SHA-256 (hex) of the bytes after
# the block, padded to USERBLOCK bytes. It is checked before HDF5 parses anything, so a damaged byte
# anywhere is an error, never a measurement, and never one of the endless loops HDF5 can fall into
# on a damaged heap (measured: a flipped byte made reading the status attribute spin for minutes).
LOG_MAGIC = b"hvd_sparse log sha256 "
USERBLOCK = 512
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _stamp(image: bytes) -> bytes:
    head = LOG_MAGIC + hashlib.sha256(image[USERBLOCK:]).hexdigest().encode() + b"\n"
    return head.ljust(USERBLOCK, b" ") + image[USERBLOCK:]


def regular_bytes(path: str | Path) -> bytes:
    """The bytes of the regular file at ``path``. A FIFO, a device or a socket named like one of this
    toolkit's files is an OSError ("not a regular file"), never a read that waits for ever: the file is
    opened without blocking and checked before anything is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a socket" if stat.S_ISSOCK(mode) else "a device")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", str(path))
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 1 << 22):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def verified_bytes(path: Path) -> bytes:
    """The log file's bytes, its checksum verified (LogError if off); logs written before 0.3.0 have
    no user block and are returned as they are."""
    data = regular_bytes(path)
    if data.startswith(HDF5_SIGNATURE):
        return data  # no user block: a log from before the checksum
    digest = data[len(LOG_MAGIC):len(LOG_MAGIC) + 64]
    if not data.startswith(LOG_MAGIC) or hashlib.sha256(data[USERBLOCK:]).hexdigest().encode() != digest:
        raise LogError(f"{path}: unreadable or corrupt HDF5 log: it fails its checksum (damaged or missing bytes), so "
                       "nothing in it is read; delete it to run that trial again")
    return data


def write_hdf5(path: Path, change: Callable[[h5py.File], None], fresh: bool = False, what: str = "log",
               source: Path | None = None) -> None:
    """``change`` applied to the HDF5 file at ``path`` (to a new, empty one if ``fresh``; to a copy of
    ``source``'s verified bytes if given), in memory; then the bytes are written with ``write_atomically``.

    HDF5 never writes to the disk itself: it reports some failed writes only when its cache is
    flushed, and h5py ignores those raised while an object is freed, leaving a half-closed file that
    can crash the interpreter at exit. Plain Python writes of finished bytes fail cleanly instead.
    """
    try:
        buffer = io.BytesIO(b"" if fresh else verified_bytes(source or path))
        with h5py.File(buffer, "w", userblock_size=USERBLOCK) if fresh else h5py.File(buffer, "r+") as f:
            change(f)
            stamped = f.userblock_size >= USERBLOCK  # a log begun before 0.3.0 has none, and stays so
    except (OSError, LogError) as e:  # the log vanished or was damaged under the run: say so, do not overwrite it
        raise StorageError(f"{path}: cannot update the {what}: {_reason(e)}") from None
    image = _stamp(buffer.getvalue()) if stamped else buffer.getvalue()
    write_atomically(path, lambda tmp: tmp.write_bytes(image), what)


def _make_folder(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{path}: cannot write the log: {_reason(e)}") from None


def _set_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        f.attrs[key] = _plain(value)


def copy_log(source: Path, target: Path, attrs: Mapping[str, Any]) -> None:
    """Write ``source``'s log (its checksum verified) to ``target`` with ``attrs`` set, stamped anew;
    the copy appears whole or not at all."""
    _make_folder(target)
    write_hdf5(target, lambda f: _set_attrs(f, attrs), source=source)


def _free_space(folder: Path) -> str:
    try:
        return f" ({shutil.disk_usage(folder).free // 1024} KiB free there)"
    except OSError:
        return ""


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and create a file in it: a read-only or misnamed output folder
    is a one-line LogError before any training, not a failure after the first evaluation."""
    try:
        for link in (folder, *folder.parents):
            if os.path.islink(link) and not os.path.exists(link):
                raise LogError(f"{what} {folder}: {link} is a symbolic link to {os.readlink(link)}, which does not exist")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hvd-sparse-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise unwritable(e, f"{what} {folder}: cannot write there: {_reason(e)}") from None


def _open(path: Path) -> tuple[h5py.File, bool]:
    """Open for reading, from the verified bytes, and whether they carried a checksum. Writers never
    modify the file in place, so no lock is needed."""
    data = verified_bytes(path)
    return h5py.File(io.BytesIO(data), "r"), not data.startswith(HDF5_SIGNATURE)


CHECKSUM_VERSION = (0, 3, 0)  # every log written since carries a checksum in its user block


def _version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in text.split("+")[0].split("."))
    except ValueError:
        return None


def check_unchecksummed(path: Path, attrs: Mapping[str, Any], columns: Mapping[str, np.ndarray]) -> None:
    """A log without a checksum is believed only as what it says it is, a log from before 0.3.0, and
    only if its result agrees with its measurements: removing the user block of a newer log (then
    editing its attributes) must not make it readable. LogError otherwise."""
    version = _version(str(attrs.get("hvd_sparse_version", "")))
    if version is None or version >= CHECKSUM_VERSION:
        raise LogError(f"{path}: no checksum, but written by hvd_sparse {attrs.get('hvd_sparse_version')!r}, whose logs "
                       "all carry one: its user block was removed, so nothing in it is believed")
    if attrs.get("status") == "RUNNING":
        return  # no result to check
    try:
        goal = float(json.loads(str(attrs["config"]))["train"]["goal_error"])
    except (ValueError, KeyError, TypeError):
        return  # no goal to check the result against
    steps, errors = columns.get("step", np.array([])), columns.get("val_error", np.array([]))
    n = min(len(steps), len(errors))
    losses = columns.get("val_loss", np.zeros(n))[:n]
    # before 0.3.0 a non-finite loss ended a trial INFEASIBLE even where its error met the goal
    reached = steps[:n][(errors[:n] <= goal) & np.isfinite(losses)]
    first = int(reached[0]) if len(reached) else None
    claimed = int(attrs.get("steps_to_result", -1))
    if (attrs.get("status") == "COMPLETE") != (first is not None) or (first is not None and claimed != first):
        raise LogError(f"{path}: no checksum, and its result (status {attrs.get('status')}, steps_to_result {claimed}) "
                       f"disagrees with its measurements (goal {goal:g} first reached at step {first}), so nothing in "
                       "it is believed")


def _plain(value: Any) -> Any:
    """str subclasses (torch.__version__ is one) become str, which h5py stores as UTF-8."""
    return str(value) if isinstance(value, str) else value


class TrialLog:
    """Append-only writer of one trial's log (use on rank 0 only)."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, path: Path, attrs: Mapping[str, Any], mask: Mask, overwrite: bool = False) -> "TrialLog":
        path = Path(path)
        if path.exists() and not overwrite:
            raise LogError(f"{path}: a log of this run already exists (use --overwrite to replace it)")
        _make_folder(path)

        def build(f: h5py.File) -> None:
            _set_attrs(f, attrs)
            f.attrs["status"] = "RUNNING"
            f.attrs["steps_to_result"] = -1
            f.attrs["created"] = time.time()
            group = f.create_group("measurements")
            for name, dtype in COLUMNS.items():
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
            f.attrs["mask_names"] = json.dumps(list(mask))
            masks = f.create_group("mask")
            for name, bits in mask.bits().items():
                ds = masks.create_dataset(name, data=bits, compression="gzip")
                ds.attrs["shape"] = tuple(mask[name].shape)

        write_hdf5(path, build, fresh=True)  # the log appears complete or not at all (and replaces an old one)
        return cls(path)

    def _update(self, change: Callable[[h5py.File], None]) -> None:
        """Apply ``change`` to the log and publish the new version atomically (see the module doc)."""
        write_hdf5(self.path, change)

    def append(self, row: Mapping[str, float | int]) -> None:
        """Append one evaluation; it is on disk (fsynced) when this returns."""
        missing = set(COLUMNS) - set(OPTIONAL_COLUMNS) - set(row)
        if missing:
            raise LogError(f"measurement is missing {sorted(missing)}")

        extra = {name: np.float64 for name in row if name not in COLUMNS}  # a measurement's own columns

        def change(f: h5py.File) -> None:
            group = f["measurements"]
            n = group["step"].shape[0]
            for name, dtype in {**COLUMNS, **extra}.items():
                if name not in group:  # a log begun by an older version, resumed by this one
                    fill = np.nan if np.issubdtype(dtype, np.floating) else 0
                    group.create_dataset(name, data=np.full(n, fill, dtype=dtype), maxshape=(None,), chunks=(256,))
                group[name].resize((n + 1,))
                group[name][n] = row.get(name, np.nan)

        self._update(change)

    def append_table(self, name: str, step: int, record: Mapping[str, Any], attrs: Mapping[str, Any] | None = None) -> None:
        """Append one row (``step`` and ``record``'s scalars or 1-D arrays) to the measurement table
        ``name`` (a group of the log, made at its first row with ``attrs``); on disk when this returns."""
        if name in RESERVED_GROUPS:
            raise LogError(f"a measurement may not be named {name!r} (a part of the log)")
        row = {"step": np.int64(step), **{k: np.asarray(v, dtype=np.float64) for k, v in record.items()}}

        def change(f: h5py.File) -> None:
            if name not in f:
                group = f.create_group(name)
                for key, value in (attrs or {}).items():
                    group.attrs[key] = np.asarray(value, dtype=np.float64)
                for key, value in row.items():
                    shape = np.shape(value)
                    group.create_dataset(key, shape=(0, *shape), maxshape=(None, *shape), dtype=np.asarray(value).dtype,
                                         chunks=(64, *shape) if shape else (256,))
            group = f[name]
            n = group["step"].shape[0]
            for key, value in row.items():
                group[key].resize(n + 1, axis=0)
                group[key][n] = value

        self._update(change)

    def truncate(self, last_step: int, world_size: int | None = None, latest: Mapping[str, Any] | None = None) -> None:
        """Drop evaluations and Lipschitz measurements after ``last_step`` (written after the checkpoint a
        run resumes from: they are redone); ``world_size``: the resumed run's, added to ``world_sizes``;
        ``latest``: attributes of the resumed run (its placement, how many trials it fused), which
        replace the earlier ones."""

        def change(f: h5py.File) -> None:
            for group in [g for g in f if g != "mask" and isinstance(f[g], h5py.Group) and "step" in f[g]]:
                keep = int(np.searchsorted(f[group]["step"][()], last_step, side="right"))
                for name in f[group]:
                    f[group][name].resize(min(keep, f[group][name].shape[0]), axis=0)
            f.attrs["resumes"] = int(f.attrs.get("resumes", 0)) + 1
            if world_size is not None:  # every world size the trial ran at, in order; world_size: the latest
                sizes = json.loads(f.attrs.get("world_sizes", json.dumps([int(f.attrs["world_size"])])))
                f.attrs["world_sizes"] = json.dumps(sizes + [world_size])
                f.attrs["world_size"] = world_size
            for name, value in (latest or {}).items():
                f.attrs[name] = value
            if f.attrs["status"] != "RUNNING":  # a CAPPED trial reopened by a study without capping
                for name in ("finished", *CAPPING_ATTRS):
                    if name in f.attrs:
                        del f.attrs[name]
                f.attrs["steps_to_result"] = -1
                f.attrs["reopened_from"] = str(f.attrs["status"])
                f.attrs["status"] = "RUNNING"

        self._update(change)

    def interrupted(self, why: str) -> None:
        """Record a stop signal; the status stays RUNNING, so a rerun resumes from the checkpoint."""

        def change(f: h5py.File) -> None:
            f.attrs["interrupted"] = why
            f.attrs["interruptions"] = int(f.attrs.get("interruptions", 0)) + 1

        self._update(change)

    def finish(self, status: str, steps_to_result: int | None, **extra: Any) -> None:
        """Record the end; all of it reaches the disk, or none of it (StorageError, status stays RUNNING)."""
        if status not in STATUSES[1:]:
            raise LogError(f"final status must be one of {STATUSES[1:]}, got {status!r}")

        def change(f: h5py.File) -> None:
            f.attrs["steps_to_result"] = -1 if steps_to_result is None else int(steps_to_result)
            f.attrs["finished"] = time.time()
            for key, value in extra.items():
                f.attrs[key] = _plain(value)
            f.attrs["status"] = status

        self._update(change)


@dataclass(frozen=True)
class LogData:
    """A trial log as ``read_log`` returns it: its attributes, its evaluation columns (``measurements``:
    name -> array, one entry per evaluation), its mask (None when read with ``with_mask=False``) and its
    measurement tables (``tables``: name -> column -> array, the table's attributes among them)."""

    path: Path
    attrs: dict[str, Any]
    measurements: dict[str, np.ndarray]
    mask: Mask | None  # None when read with with_mask=False
    tables: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # measurement tables, with their attrs

    @property
    def lipschitz(self) -> dict[str, np.ndarray]:
        """The Lipschitz measurements: step, value, per_gamma, gammas; {} if none."""
        return self.tables.get("lipschitz", {})

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.attrs["config"])

    @property
    def status(self) -> str:
        return str(self.attrs["status"])

    @property
    def steps_to_result(self) -> int | None:
        value = int(self.attrs["steps_to_result"])
        return None if value < 0 else value


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_log(path: str | Path, with_mask: bool = True) -> LogData:
    """Read a log (also one still being written); LogError if it is not a valid trial log."""
    path = Path(path)
    try:
        opened, checksummed = _open(path)
        with opened as f:
            _check_extents(f, path)
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            missing = [a for a in REQUIRED_ATTRS if a not in attrs]
            if missing or "measurements" not in f:
                raise LogError(f"{path}: not a trial log (missing {missing or ['measurements']})")
            group = f["measurements"]
            columns = {name: group[name][()] for name in [*COLUMNS, *sorted(set(group) - set(COLUMNS))] if name in group}
            n = min((len(c) for c in columns.values()), default=0)
            columns = {k: v[:n] for k, v in columns.items()}  # a column may be one ahead mid-append
            tables = {name: _read_table(f[name]) for name in f
                      if name not in RESERVED_GROUPS and isinstance(f[name], h5py.Group) and "step" in f[name]}
            mask = None
            if with_mask and "mask" in f:
                # insertion (model) order, which the checksum depends on; h5py lists names sorted
                order = json.loads(attrs["mask_names"]) if "mask_names" in attrs else list(f["mask"])
                bits = {name: f["mask"][name][()] for name in order}
                mask = Mask.from_bits(bits, {name: tuple(f["mask"][name].attrs["shape"]) for name in order})
    except LogError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError, OverflowError, MemoryError) as e:
        first = e.strerror if isinstance(e, OSError) and e.strerror else (
            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise LogError(f"{path}: unreadable or corrupt HDF5 log: {first}") from None
    if not checksummed:
        check_unchecksummed(path, attrs, columns)
    return LogData(path, attrs, columns, mask, tables)


def _check_extents(f: h5py.File, path: Path) -> None:
    """A damaged dimension can make a dataset or an attribute claim gigabytes (h5py then allocates
    them, and reads garbage into them for minutes): refuse before reading any."""
    limit = 1000 * max(path.stat().st_size, 1 << 20)

    def check(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Dataset) and obj.size * obj.dtype.itemsize > limit:
            raise LogError(f"{path}: corrupt HDF5 log: dataset {name} claims {obj.shape} entries")
        for key in obj.attrs:
            attr = obj.attrs.get_id(key)
            if math.prod(attr.shape or ()) * max(attr.dtype.itemsize, 1) > limit:
                raise LogError(f"{path}: corrupt HDF5 log: attribute {key} of {name} claims {attr.shape} entries")

    check("/", f)
    f.visititems(check)


def _read_table(group: h5py.Group) -> dict[str, np.ndarray]:
    """A measurement table's columns (cut to the shortest: one may be a row ahead mid-append) and attributes."""
    out = {name: group[name][()] for name in group}
    n = min(len(v) for v in out.values())
    return {**{k: v[:n] for k, v in out.items()}, **{k: np.asarray(v) for k, v in group.attrs.items()}}
