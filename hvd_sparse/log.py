"""Per-trial HDF5 logs: written by rank 0, readable at any time, even while the run goes on.

The file is opened, appended to and closed at every evaluation, so between evaluations it is a
complete, consistent HDF5 file: a run killed between two evaluations leaves every flushed
measurement readable. Schema (documented in README.md, checked by ``validate``):

  attrs: config (JSON), run_hash, status, steps_to_result (-1 if not reached), world_size,
         mask_sha256, mask_density, hvd_sparse_version, torch_version, horovod_version,
         created, finished
  measurements/<column>  1-D datasets, one entry per evaluation (see COLUMNS)
  mask/<param name>      np.packbits of the flattened boolean mask, attr ``shape``
                         (attr mask_names lists them in model order; read_log returns a Mask)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

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
}
STATUSES = ("RUNNING", "COMPLETE", "INCOMPLETE", "INFEASIBLE")
REQUIRED_ATTRS = (
    "config", "run_hash", "status", "steps_to_result", "world_size", "mask_sha256",
    "hvd_sparse_version", "torch_version", "horovod_version",
)


class LogError(ValueError):
    """A log file that cannot be created, appended to, or read."""


def _open(path: Path, mode: str, retries: int = 20) -> h5py.File:
    """Open, retrying briefly while another process (the writer) holds the file."""
    for attempt in range(retries):
        try:
            return h5py.File(path, mode, locking=mode != "r")
        except BlockingIOError:
            time.sleep(0.05 * (attempt + 1))
        except OSError as e:
            if "lock" not in str(e).lower() or attempt == retries - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise LogError(f"{path}: could not be opened")


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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with h5py.File(tmp, "w") as f:
                for key, value in attrs.items():
                    f.attrs[key] = _plain(value)
                f.attrs["status"] = "RUNNING"
                f.attrs["steps_to_result"] = -1
                f.attrs["created"] = time.time()
                group = f.create_group("measurements")
                for name, dtype in COLUMNS.items():
                    group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
                f.attrs["mask_names"] = json.dumps(list(mask))
                masks = f.create_group("mask")
                for name, bits in mask.packed().items():
                    ds = masks.create_dataset(name, data=bits, compression="gzip")
                    ds.attrs["shape"] = tuple(mask[name].shape)
            tmp.replace(path)  # the log appears complete or not at all
        except OSError as e:
            raise LogError(f"{path}: cannot write the log: {e.strerror or e}") from None
        return cls(path)

    def append(self, row: Mapping[str, float | int]) -> None:
        """Append one evaluation; the file is closed (flushed) before this returns."""
        missing = set(COLUMNS) - set(row)
        if missing:
            raise LogError(f"measurement is missing {sorted(missing)}")
        with _open(self.path, "a") as f:
            group = f["measurements"]
            n = group["step"].shape[0]
            for name in COLUMNS:
                group[name].resize((n + 1,))
                group[name][n] = row[name]

    def truncate(self, last_step: int) -> None:
        """Drop evaluations after ``last_step`` (written after the checkpoint a run resumes from)."""
        with _open(self.path, "a") as f:
            group = f["measurements"]
            keep = int(np.searchsorted(group["step"][()], last_step, side="right"))
            for name in COLUMNS:
                group[name].resize((min(keep, group[name].shape[0]),))
            f.attrs["resumes"] = int(f.attrs.get("resumes", 0)) + 1

    def interrupted(self, why: str) -> None:
        """Record a stop signal; the status stays RUNNING, so a rerun resumes from the checkpoint."""
        with _open(self.path, "a") as f:
            f.attrs["interrupted"] = why
            f.attrs["interruptions"] = int(f.attrs.get("interruptions", 0)) + 1

    def finish(self, status: str, steps_to_result: int | None, **extra: Any) -> None:
        if status not in STATUSES[1:]:
            raise LogError(f"final status must be one of {STATUSES[1:]}, got {status!r}")
        with _open(self.path, "a") as f:
            f.attrs["status"] = status
            f.attrs["steps_to_result"] = -1 if steps_to_result is None else int(steps_to_result)
            f.attrs["finished"] = time.time()
            for key, value in extra.items():
                f.attrs[key] = _plain(value)


@dataclass(frozen=True)
class LogData:
    path: Path
    attrs: dict[str, Any]
    measurements: dict[str, np.ndarray]
    mask: Mask | None  # None when read with with_mask=False

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
        with _open(path, "r") as f:
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
            missing = [a for a in REQUIRED_ATTRS if a not in attrs]
            if missing or "measurements" not in f:
                raise LogError(f"{path}: not a trial log (missing {missing or ['measurements']})")
            group = f["measurements"]
            columns = {name: group[name][()] for name in COLUMNS if name in group}
            n = min((len(c) for c in columns.values()), default=0)
            columns = {k: v[:n] for k, v in columns.items()}  # a column may be one ahead mid-append
            mask = None
            if with_mask and "mask" in f:
                # insertion (model) order, which the checksum depends on; h5py lists names sorted
                order = json.loads(attrs["mask_names"]) if "mask_names" in attrs else list(f["mask"])
                packed = {name: f["mask"][name][()] for name in order}
                mask = Mask.from_packed(packed, {name: tuple(f["mask"][name].attrs["shape"]) for name in order})
    except LogError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise LogError(f"{path}: unreadable or corrupt HDF5 log: {e}") from None
    return LogData(path, attrs, columns, mask)
