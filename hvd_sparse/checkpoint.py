"""Trial checkpoints and the decision where a run starts: fresh, or from its last checkpoint.

Rank 0 writes ``<log>.ckpt.pt`` atomically after every evaluation it logged; a run whose log says
RUNNING (it was killed or preempted) and has a checkpoint resumes from it, and loses only the steps
since that evaluation. Batches are a pure function of the step and the model and optimizer state
are restored exactly, so the resumed run measures exactly what an uninterrupted one would have.
A lock file keeps two processes from running the same trial at once.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hvd_sparse.log import LogError, read_log, regular_bytes, write_atomically
from hvd_sparse.mask import Mask

logger = logging.getLogger("hvd_sparse")


# studies have no --overwrite: a study starts a trial over when its log and checkpoint are removed
START_OVER = "remove it and the log beside it to start the trial over (hvd_sparse.train: or pass --overwrite)"


def checkpoint_path(log: Path) -> Path:
    return log.with_suffix(".ckpt.pt")


@dataclass(frozen=True)
class Progress:
    """A trial's scalar state at a checkpoint, the same on every rank; with the model and optimizer
    state beside it, exactly what the engine's TrialState holds."""

    step: int = 0
    best_val_error: float = float("inf")
    wall_time: float = 0.0  # seconds trained so far, across resumes
    # per rank [sum of batch losses, batches] since the last evaluation; empty at an evaluation
    train_loss: tuple[tuple[float, float], ...] = ()
    # each measurement's state (``Measurement.state``, by name): the noise-scale averages continue across a resume
    measures: dict[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    progress: Progress
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    mask: Mask


def save_checkpoint(log: Path, progress: Progress, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    run_hash: str, mask_sha256: str, data_fingerprint: str = "") -> None:
    """Write the checkpoint so that a reader sees the old one or the new one, never a mix."""
    state = {
        "step": progress.step, "best_val_error": progress.best_val_error, "wall_time": progress.wall_time,
        "train_loss": [list(pair) for pair in progress.train_loss], "measures": {name: list(v) for name, v in progress.measures.items()},
        "run_hash": run_hash, "mask_sha256": mask_sha256, "data_fingerprint": data_fingerprint,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    image = CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    write_atomically(checkpoint_path(log), lambda tmp: tmp.write_bytes(image), "checkpoint")


# A checkpoint file: this line, the SHA-256 of the payload in hex and a newline, then the payload
# (torch.save's bytes). torch's own format carries no checksum, so damaged bytes loaded without a word.
CHECKPOINT_MAGIC = b"hvd_sparse checkpoint sha256 "


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """The verified state of a checkpoint file; LogError (never the state) if any byte is off."""
    try:
        data = regular_bytes(path)
    except OSError as e:
        raise LogError(f"{path}: unreadable checkpoint ({e.strerror or e}); {START_OVER}") from None
    if data.startswith(CHECKPOINT_MAGIC):
        head, _, payload = data[len(CHECKPOINT_MAGIC):].partition(b"\n")
        if hashlib.sha256(payload).hexdigest().encode() != head:
            raise LogError(f"{path}: the checkpoint fails its checksum (damaged bytes), so it is not used; {START_OVER}")
    else:
        payload = data  # written before 0.3.0: no checksum to check
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise LogError(f"{path}: unreadable checkpoint ({type(e).__name__}); {START_OVER}") from None


def plan_start(log: Path, run_hash: str, overwrite: bool, data_fingerprint: str = "",
               reopen_capped: bool = False, world_size: int | None = None, strict_world_size: bool = False
               ) -> Checkpoint | None:
    """The checkpoint to resume from, or None to start fresh; LogError if the run already ended.

    No log, ``overwrite``, or a RUNNING log without a checkpoint (killed before its first one):
    fresh. A RUNNING log with a checkpoint of the same run: resume. A finished log: refuse; but a
    CAPPED one with ``reopen_capped`` (a study without capping) resumes like a RUNNING one. A resume
    at another ``world_size`` than the log's is said (a warning), or refused with ``strict_world_size``.
    """
    if overwrite or not log.exists():
        return None
    data = read_log(log)
    if data.status != "RUNNING" and not (reopen_capped and data.status == "CAPPED"):
        raise LogError(f"{log}: this run already ended ({data.status}); pass --overwrite to run it again")
    logged = str(data.attrs.get("data_fingerprint", ""))  # logs before 0.3.0 do not say
    if logged and data_fingerprint and logged != data_fingerprint:
        raise LogError(f"{log}: this run was trained on other data (SHA-256 {logged[:12]}, now {data_fingerprint[:12]}); "
                       "resuming onto it would mix two datasets in one trial: point --data-dir back, or use another --out")
    path = checkpoint_path(log)
    if not path.exists():
        return None
    state = load_checkpoint_state(path)
    if state.get("run_hash") != run_hash or state.get("mask_sha256") != data.attrs["mask_sha256"] or (
            state.get("data_fingerprint") and data_fingerprint and state["data_fingerprint"] != data_fingerprint):
        raise LogError(f"{path}: checkpoint of another run or mask; {START_OVER}")
    check_world_size(log, int(data.attrs["world_size"]), world_size, strict_world_size)
    assert data.mask is not None
    train_loss = tuple((float(a), float(b)) for a, b in state.get("train_loss", []))
    measures = state.get("measures", {"noise_scale": state.get("noise", [])})  # before 0.5.0: the noise scale's alone
    progress = Progress(int(state["step"]), float(state["best_val_error"]), float(state["wall_time"]), train_loss=train_loss,
                        measures={name: tuple(float(v) for v in values) for name, values in measures.items()})
    return Checkpoint(progress, state["model"], state["optimizer"], data.mask)


def check_world_size(log: Path, was: int, now: int | None, strict: bool) -> None:
    """np=k is np=1's optimization up to float summation order; a trial resumed at another world size
    changes that order from the resume on, and the difference compounds over hundreds of steps."""
    if now is None or now == was:
        return
    if strict:
        raise LogError(f"{log}: interrupted at world size {was}; --strict-world-size refuses to resume it at {now} "
                       f"(rerun with {was} ranks, or without --strict-world-size)")
    logger.warning("%s: resuming at world size %d a trial interrupted at %d: the same optimization only up to float "
                   "summation order, which compounds over hundreds of steps (the log's world_sizes records it; "
                   "--strict-world-size refuses)", log, now, was)


class RunLock:
    """An exclusive lock on ``<log>.lock`` for as long as a process runs the trial."""

    def __init__(self, log: Path):
        self.path = log.with_suffix(".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        if not self.try_acquire():
            raise LogError(f"{self.path}: another process is running this trial right now")

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it; False if one does."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LogError(f"{self.path}: cannot create the run's lock file: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
