"""Ranks never outlive their launcher.

A hard kill of ``horovodrun`` (a CI runner's cancel, a scheduler's SIGKILL after its grace period, the
OOM killer) leaves ``mpirun`` and every rank re-parented and training on, holding the trial's lock. So
each rank watches the chain of launcher processes above it (``mpirun``, the shell ``horovodrun`` has
become, ``srun``'s ``slurmstepd``, ``torchrun``), recorded when it starts: when a link of that chain
is gone (exited, a zombie, or the rank re-parented), the rank treats it as a stop signal, so the trial
checkpoints at the next agreed step as it does on SIGTERM; if the rank is still alive ``grace``
seconds later (it was inside an evaluation, or a peer is gone too), it exits with one line.

The grace follows the pace of the run: the engine reports how long its steps, evaluations and
checkpoints take (``PACE``), and a rank waits for as long as reaching the next agreed step
(``STOP_CHECK_EVERY`` steps away at most) and checkpointing takes at the slowest pace seen lately,
HVD_SPARSE_LAUNCHER_GRACE at least and ``GRACE_BOUND`` at most; where that is not enough it says so
when the launcher goes.

A launcher can also be gone before the rank could see it: ``horovodrun`` killed in the seconds
between its start of ``mpirun`` and the ranks' own start (they import torch first) leaves an
``mpirun`` re-parented to init, the top of the chain the rank finds. Such an orphan whose process
group's leader (the ``horovodrun`` that started it) no longer exists counts as a launcher gone. An
``mpirun`` detached on purpose leads its own group (``nohup mpirun ... &`` in an interactive shell,
``setsid mpirun``) and is watched as usual; a script that starts ``mpirun &`` in the background and
exits without waiting makes its job stop at once, with a line that says to use ``setsid``.

A rank started by hand (``python -m hvd_sparse.train``, even under ``nohup``) has no launcher above
it and is not watched.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Callable

import psutil

from hvd_sparse import settings

STOP_CHECK_EVERY = 10  # steps between the engine's collective checks for a stop signal: the agreed step is this near
GRACE_BOUND = 900.0  # seconds: the longest a rank waits, however slow its steps, once its launcher is gone


class Pace:
    """The recent durations of this rank's steps, evaluations and checkpoints (the engine reports
    them; the launcher watch reads them from its thread)."""

    def __init__(self, keep: int = 2 * STOP_CHECK_EVERY):
        self.recent: dict[str, collections.deque[float]] = {
            kind: collections.deque(maxlen=keep) for kind in ("step", "evaluation", "checkpoint")}
        self.lock = threading.Lock()

    def note(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.recent[kind].append(seconds)

    def needed(self) -> float:
        """Seconds to reach the next agreed step and checkpoint there, at the slowest recent pace: up to
        STOP_CHECK_EVERY steps, an evaluation due on the way, the checkpoint, and 2 s to spare."""
        with self.lock:
            slowest = {kind: max(values, default=0.0) for kind, values in self.recent.items()}
        return STOP_CHECK_EVERY * slowest["step"] + slowest["evaluation"] + slowest["checkpoint"] + 2.0


PACE = Pace()


def grace_for(configured: float, pace: Pace) -> tuple[float, float]:
    """(the seconds to wait after the launcher is gone, the seconds the run needs)."""
    needed = pace.needed()
    return max(configured, min(needed, GRACE_BOUND)), needed


MPI_LAUNCHERS = frozenset({"mpirun", "mpiexec", "orterun", "prterun"})
LAUNCHERS = MPI_LAUNCHERS | {"horovodrun", "srun", "slurmstepd", "torchrun"}
POLL_SECONDS = 0.5


def is_launcher(name: str, cmdline: list[str]) -> bool:
    """Whether a process (its name and argv) is one of LAUNCHERS: run directly, as a Python script
    (``python .../horovodrun``, ``python -m torch.distributed.run``), or as the ``sh -c 'mpirun ...'``
    that horovodrun execs into."""
    if name in LAUNCHERS or not cmdline:
        return name in LAUNCHERS
    first = os.path.basename(cmdline[0])
    if first in LAUNCHERS:
        return True
    if first.startswith("python") and len(cmdline) > 1:
        return os.path.basename(cmdline[1]) in LAUNCHERS or cmdline[1:3] == ["-m", "torch.distributed.run"]
    if first in ("sh", "bash", "dash") and len(cmdline) > 2 and cmdline[1] == "-c":
        words = cmdline[2].split()
        return bool(words) and os.path.basename(words[0]) in LAUNCHERS
    return False


def launcher_chain(process: psutil.Process | None = None) -> list[psutil.Process]:
    """The consecutive launchers above ``process`` (default: this one), nearest first; empty when
    its parent is not a launcher."""
    chain = []
    parent = (process or psutil.Process()).parent()
    while parent is not None and parent.pid > 1:
        try:
            if not is_launcher(parent.name(), parent.cmdline()):
                break
        except psutil.Error:
            break
        chain.append(parent)
        parent = parent.parent()
    return chain


def lost_link(me: psutil.Process, chain: list[psutil.Process]) -> psutil.Process | None:
    """The first launcher of ``chain`` that is gone, or that its child no longer hangs below."""
    child = me
    for launcher in chain:
        try:
            if child.ppid() != launcher.pid or launcher.status() == psutil.STATUS_ZOMBIE:
                return launcher
        except psutil.Error:
            return launcher
        child = launcher
    return None



def orphaned(top: psutil.Process) -> int | None:
    """The pid of the gone process group leader of ``top`` (the outermost launcher above a rank) if
    ``top`` is an mpirun that was orphaned: re-parented to init, in a group whose leader exited; else
    None. Only mpirun: slurmstepd is re-parented to init and leaves its group by design."""
    try:
        if top.ppid() != 1 or top.name() not in MPI_LAUNCHERS:
            return None
        group = os.getpgid(top.pid)
    except (psutil.Error, OSError):
        return None
    return None if group == top.pid or psutil.pid_exists(group) else group


def describe(process: psutil.Process) -> str:
    try:
        words = process.cmdline()
    except psutil.Error:
        words = []
    name = os.path.basename(words[0]) if words else "launcher"
    if name.startswith("python") and len(words) > 1:
        name = os.path.basename(words[1])
    elif name in ("sh", "bash", "dash") and len(words) > 2:
        # horovodrun execs into `sh -c 'mpirun ...'`: the pid is the one horovodrun was started with, and
        # mpirun itself is this shell's child (its own link of the chain)
        launcher = os.path.basename(words[2].split()[0]) if words[2].split() else "?"
        name = f"{'horovodrun/' if launcher == 'mpirun' else ''}{name} -c {launcher}"
    return f"{name} (pid {process.pid})"


def watch_launcher(on_lost: Callable[[str], None], prog: str, grace: float | None = None) -> threading.Thread | None:
    """Start the watcher thread (a daemon); None when no launcher is above this process. ``grace``:
    HVD_SPARSE_LAUNCHER_GRACE unless given (checked here, before the thread starts)."""
    grace = settings.launcher_grace() if grace is None else grace
    me = psutil.Process()
    chain = launcher_chain(me)
    if not chain:
        return None
    names = [describe(p) for p in chain]  # now, while their command lines can still be read
    gone = orphaned(chain[-1])

    def run() -> None:
        if gone is not None:
            what = f"that started {names[-1]} (pid {gone}, its process group's leader)"
            print(f"{prog}: warning: the launcher {what} exited before this rank started; stopping as if it had "
                  "exited now (to detach a job on purpose, start mpirun under setsid)", file=sys.stderr, flush=True)
        else:
            while (lost := lost_link(me, chain)) is None:
                time.sleep(POLL_SECONDS)
            what = names[chain.index(lost)]
        on_lost(f"the exit of its launcher {what}")
        wait, needed = grace_for(grace, PACE)
        if needed > wait:
            print(f"{prog}: warning: the launcher {what} exited; reaching the next agreed step and checkpointing "
                  f"takes about {needed:.0f} s at this run's pace, over the {wait:g} s a rank waits: it may exit "
                  "without that checkpoint (a rerun resumes from the one before)", file=sys.stderr, flush=True)
        time.sleep(wait)
        print(f"{prog}: error: the launcher {what} exited {wait:g} s ago and this rank did not stop by "
              f"itself; exiting (a rerun resumes from the last checkpoint)", file=sys.stderr, flush=True)
        os._exit(1)

    thread = threading.Thread(target=run, name="hvd_sparse-launcher-watch", daemon=True)
    thread.start()
    return thread
