"""Capping and best-first order: what a study skips without changing its answer.

A study cell's answer is the lowest steps-to-result of its COMPLETE trials. Once some trial of the cell
reached the goal at step ``b`` (the *bound*), another trial whose evaluation at a step ``s >= b`` misses
the goal can no longer beat it: it stops there as CAPPED (adaptive capping, as in ParamILS and SMAC). A
goal reached exactly at the bound still counts, so ties are decided as without capping, and the cell's
steps-to-result, its best trial and that trial's log are exactly those of an uncapped run.

The bound lives in memory for the trials of this process and in the cell's ``cell.json`` for everyone
else (packed groups, shards, a later resume): one entry per ended trial, written under a lock and
replaced atomically, with a SHA-256 of its content. The file only ever tightens the bound; an entry
whose trial log is gone, whose run hash is not the trial's, or a file that fails its checksum, is not
believed (a looser bound costs time, never the answer).

Best-first order: a cell runs first the trial that was best at the nearest batch size already measured
(same optimizer and sparsity), then the others in trial order, so that the bound is tight early.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from hvd_sparse.log import regular_bytes

logger = logging.getLogger("hvd_sparse")

CELL_FILE = "cell.json"


@dataclass(frozen=True)
class Ended:
    """What the cell record keeps of an ended trial."""

    status: str
    steps_to_result: int | None
    run_hash: str


@dataclass(frozen=True)
class Bound:
    """The lowest steps-to-result a cell has found so far, and the trial that found it."""

    steps: int
    trial_id: int


def tightest(bounds: Iterable[Bound | None]) -> Bound | None:
    """The lowest bound: fewest steps, then the lowest trial id (the aggregator's tie rule); None if none."""
    found = [(b.steps, b.trial_id) for b in bounds if b is not None]
    return Bound(*min(found)) if found else None


def best(ended: Mapping[int, Ended]) -> Bound | None:
    """The best COMPLETE trial."""
    return tightest(Bound(e.steps_to_result, t) for t, e in ended.items()
                    if e.status == "COMPLETE" and e.steps_to_result is not None)


def log_name(trial_id: int) -> str:
    return f"trial-{trial_id:03d}.h5"


class CellRecord:
    """The ended trials of one study cell: this process's in memory, everyone's in ``<cell>/cell.json``.

    ``run_hashes`` maps every trial id of the cell (all shards) to its run hash: an entry is believed
    only for a trial of this cell whose log exists.
    """

    def __init__(self, folder: Path, run_hashes: Mapping[int, str]):
        self.folder, self.run_hashes = folder, dict(run_hashes)
        self.known: dict[int, Ended] = {}
        self.warned = False  # a damaged file is said once, not at every evaluation

    @property
    def path(self) -> Path:
        return self.folder / CELL_FILE

    def read(self) -> dict[int, Ended]:
        """The file's believable entries ({} when it is missing or damaged)."""
        try:
            record = json.loads(regular_bytes(self.path))
            body = record["trials"]
            if record.get("sha256") != _digest(body):
                raise ValueError("checksum")
            entries = {int(t): Ended(str(e["status"]), None if e["steps_to_result"] is None else int(e["steps_to_result"]),
                                     str(e["run_hash"])) for t, e in body.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            if not self.warned:
                logger.warning("%s: not used for capping (%s); the bound comes from this process's trials only",
                               self.path, type(e).__name__ if not isinstance(e, ValueError) else e)
            self.warned = True
            return {}
        return {t: e for t, e in entries.items()
                if self.run_hashes.get(t) == e.run_hash and (self.folder / log_name(t)).is_file()}

    def ended(self) -> dict[int, Ended]:
        return {**self.read(), **self.known}

    def bound(self) -> Bound | None:
        return best(self.ended())

    def record(self, trial_id: int, status: str, steps_to_result: int | None) -> None:
        """Remember an ended trial, and add it to the cell file (under its lock; a file that cannot be
        written is said once and capping goes on with what this process knows)."""
        entry = Ended(status, steps_to_result, self.run_hashes[trial_id])
        if self.known.get(trial_id) == entry:
            return
        self.known[trial_id] = entry
        try:
            self._write(trial_id, entry)
        except OSError as e:
            logger.warning("%s: cannot record trial %d for capping (%s)", self.path, trial_id, e.strerror or e)

    def forget(self, trial_id: int) -> None:
        """A trial that (re)starts has no result: an entry left from a log that was removed and is being
        made again must not bound the others."""
        self.known.pop(trial_id, None)
        if trial_id in self.read():
            try:
                self._write(trial_id, None)
            except OSError as e:
                logger.warning("%s: cannot update the record of trial %d (%s)", self.path, trial_id, e.strerror or e)

    def _write(self, trial_id: int, entry: Ended | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / (CELL_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # read, change, replace: one process at a time
            entries = {t: e for t, e in self.read().items()}
            if entry is None:
                entries.pop(trial_id, None)
            else:
                entries[trial_id] = entry
            body = {str(t): {"status": e.status, "steps_to_result": e.steps_to_result, "run_hash": e.run_hash}
                    for t, e in sorted(entries.items())}
            tmp = self.path.with_name(f"{CELL_FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"trials": body, "sha256": _digest(body)}, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        finally:
            os.close(fd)


def _digest(body: Mapping) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def best_first(trial_ids: Sequence[int], batch_size: int, neighbours: Mapping[int, Bound | None]) -> list[int]:
    """``trial_ids`` with the best trial of the nearest measured batch size first (nearest on a log
    scale, the smaller of two equally near), the rest in their order. ``neighbours``: batch size ->
    the best trial there, None where none has reached the goal (yet)."""
    measured = [(abs(math.log2(b / batch_size)), b, found.trial_id) for b, found in neighbours.items()
                if found is not None and b != batch_size]
    if not measured:
        return list(trial_ids)
    first = min(measured)[2]
    return ([first] if first in trial_ids else []) + [t for t in trial_ids if t != first]


def capped_at(step: int, goal_reached: bool, bound: Bound | None) -> bool:
    """Whether a trial that has just been evaluated at ``step`` stops as CAPPED under ``bound``."""
    return bound is not None and not goal_reached and step >= bound.steps
