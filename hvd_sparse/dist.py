"""Rank/size, collectives and gradient averaging, on the engine the job was launched for (``engines``:
Horovod, or torch.distributed); the rest of the package speaks to this module only.

Every collective here is called by all ranks in the same order. ``agree`` turns a failure on any
rank into the same exception on every rank, so no rank is ever left waiting in a collective.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

from hvd_sparse import engines, settings
from hvd_sparse.beacon import Beacon
from hvd_sparse.mask import Mask

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Some rank failed or ranks disagree; raised on every rank with the same message."""


class PeerInputError(DistributedError, ValueError):
    """Another rank's input was bad (a ValueError there: configuration, data, logs): the ranks that
    did not see it fail as input errors too, so every rank exits with the same code (2)."""


class PeerFailure(RuntimeError):
    """Raised by a collective when the engine shut down because another rank failed outside ``agree``
    (it exited before its first collective, or it called a different one): that rank said why itself."""


PEER_FAILURE_MESSAGE = "another rank failed or left the job, so the collectives shut down (that rank's own error is above)"


_e: engines.Collectives | None = None  # the engine, once ``init`` chose it
# Trial packing (study --pack): the world split into groups, each its own job (see ``init``).
_node: tuple[int, int] = (0, 1)  # this process's rank among the job's ranks on its node, and their number
_group: tuple[int, int] = (0, 1)  # this rank's group, and the number of groups


# Set by init() where the environment does not set them already (HVD_SPARSE_HOROVOD_DEFAULTS=0: none of
# them). Evidence: BENCHMARKS.md, benchmarks/horovod_knobs.py. Open MPI busy-polls while Horovod's
# background thread waits in a collective, taking the core from the rank's own compute threads on
# machines with few cores per rank; yielding gives it back (Open MPI turns this on by itself only
# when a node runs more ranks than it has slots, which never counts the compute threads).
LAUNCH_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}


def apply_launch_defaults() -> dict[str, str]:
    """Put LAUNCH_DEFAULTS into this process's environment (before MPI starts); returns what it set."""
    if not settings.horovod_defaults():
        return {}
    missing = {k: v for k, v in LAUNCH_DEFAULTS.items() if k not in os.environ}
    os.environ.update(missing)
    return missing


def init(groups: int = 1, backend: str = "auto") -> None:
    """Start the engine (``engines.choose(backend)``) and give each rank one share of the cores on its
    node (unless OMP_NUM_THREADS says otherwise).

    ``groups`` > 1 packs trials: the world is split into that many groups of consecutive ranks
    (world size / groups each), and the engine runs on this rank's group alone, so every collective,
    rank 0 and the world size below are the group's. The world stays reachable through the
    ``world_*`` functions. On Horovod it needs an MPI launch (horovodrun with MPI, mpirun, srun
    --mpi=pmix). Idempotent: a study calls it once and then runs many trials in the same job.
    """
    global _e, _node, _group
    if _e is not None and _e.is_initialized():
        return
    if groups < 1:
        raise ValueError(f"--pack must be a positive number of groups, got {groups}")
    name = engines.choose(backend)
    if name == "horovod":
        apply_launch_defaults()
    _e = engines.make(name)
    _node, _group = _e.init(groups)
    _start_beacon()
    if _packed():
        _start_world_watch()
    if settings.omp_threads() is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // _node[1]))


def _engine() -> engines.Collectives:
    """The engine; before ``init``, the one the launch calls for (an error on the way in still says
    goodbye through it, in ``exit_barrier``)."""
    global _e
    if _e is None:
        _e = engines.make(engines.choose("auto"))
    return _e


def backend() -> str:
    return _engine().name


def _packed() -> bool:
    return _group[1] > 1


def group() -> tuple[int, int]:
    """(this rank's group, number of groups); (0, 1) unless trials are packed."""
    return _group


def world_is_root() -> bool:
    return _engine().world_rank() == 0 if _packed() else is_root()


def world_allgather(obj: T, name: str) -> list[T]:
    """Every world rank's ``obj`` on every rank, across all groups of a packed job (the group's own
    allgather when not packed)."""
    if not _packed():
        return allgather_object(obj, name)
    with waiting_for_the_world(name):
        return _engine().world_allgather(obj)


def world_verify_same(value: str, what: str) -> None:
    """``verify_same_everywhere`` across all groups of a packed job (the group's own when not packed)."""
    if not _packed():
        return verify_same_everywhere(value, what)
    with waiting_for_the_world(what):
        _require_same(_engine().world_allgather(value), what)


# -- the collective watchdog ----------------------------------------------------------------------
#
# A rank that freezes (SIGSTOP, a hung NFS mount, a wedged GPU driver) leaves the others waiting in a
# collective forever: Horovod's stall inspector never fires then, because rank 0's background thread
# is itself blocked in MPI (measured: HOROVOD_STALL_CHECK_TIME_SECONDS=5, one rank stopped, no
# warning in 45 s). So each rank times its own waits in the collectives below; one that lasts longer
# than the timeout ends this rank with one line, and the launcher then ends the job. Only waiting
# counts, never computing, so long evaluations or a slow first step never trip it. The line names the
# ranks that did not arrive, from heartbeats sent outside MPI (``beacon``).

_timeout: float | None = None  # HVD_SPARSE_COLLECTIVE_TIMEOUT, read once (settings.collective_timeout); 0: never
program = "hvd_sparse"  # the command's name in the watchdog's line (cli.guarded sets it)
_waiting: list[tuple[str, float, float]] = []  # the collective this rank waits in, since when (monotonic), its limit
_watchdog: threading.Thread | None = None
_waiting_lock = threading.Lock()
AGREE_PATIENCE = 4.0  # ``agree`` waits for one rank's work (SNIP on rank 0 can take minutes): 4x the timeout


_beacon: Beacon | None = None
_entered = 0  # collectives this rank has entered (every rank enters the same ones, in the same order)


def collective_timeout() -> float:
    global _timeout
    if _timeout is None:
        _timeout = settings.collective_timeout()
    return _timeout


def _poll(timeout: float) -> float:
    return min(1.0, timeout / 4)


def _start_beacon() -> None:
    """The heartbeats that let a timed-out wait name the late ranks (``beacon``): rank 0 opens its
    socket and tells the others where it listens. Every rank of a job of two or more takes part."""
    global _beacon
    if size() == 1:
        return
    _beacon = _connected_beacon(rank(), size(), lambda obj, step: allgather_object(obj, f"hvd_sparse.beacon.{step}"))


def _connected_beacon(me: int, ranks: int, allgather: Callable[[Any, str], list[Any]]) -> Beacon:
    beacon = Beacon(me, ranks, _poll(collective_timeout() or 300.0))
    beacon.connect(allgather(beacon.listen_at() if me == 0 else None, "address")[0])
    # one round now, so that every rank has heard from rank 0 before any long wait (where UDP passes):
    # the others send, rank 0 takes them in and answers, the others read the answer
    for step in ("sent", "answered"):
        beacon.beat(_entered, False)
        allgather(None, step)
    beacon.beat(_entered, False)
    return beacon


STOPPED_MARGIN = 2.0  # seconds a watchdog's sleep may overrun before it counts as this process stopped


def _own_stop(beacon: Beacon | None, elapsed: float, poll: float) -> float:
    """How long this process was stopped itself (SIGSTOP, a suspended job) during a watchdog's sleep of
    ``poll`` that took ``elapsed``; 0.0 when it was not. That time is neither a wait in a collective
    nor news of another rank's silence: the beacon pauses for it, and the caller takes it off its waits."""
    stopped = elapsed - poll
    if stopped <= STOPPED_MARGIN:
        return 0.0
    if beacon is not None:
        beacon.pause(stopped)
    return stopped


def _watch(timeout: float) -> None:
    poll = _poll(timeout)
    last = time.monotonic()
    while True:
        time.sleep(poll)
        now = time.monotonic()
        with _waiting_lock:
            stopped = _own_stop(_beacon, now - last, poll)
            if stopped:  # woken, it trains on, or is being ended: either way the stop was no wait
                _waiting[:] = [(name, since + stopped, limit) for name, since, limit in _waiting]
            current = _waiting[-1] if _waiting else None
            entered = _entered
        last = now
        if _beacon is not None:
            _beacon.beat(entered, current is not None, now)
        waited = now - current[1] if current is not None else 0.0
        # a longer patience (rank 0's own work, e.g. SNIP) holds only while the awaited ranks are alive
        silent = waited > timeout and _beacon is not None and _beacon.someone_silent(now)
        if current is not None and (waited > current[2] or silent):
            name, _, limit = current
            limit = timeout if silent else limit
            late = _beacon.late(now) if _beacon is not None else None
            who = f"did not arrive: {late}" if late else \
                "one of them is frozen or lost (the ranks that print this line are the ones that arrived)"
            print(f"{program}: error: rank {rank()} waited {limit:g} s in the collective {name!r} for "
                  f"the other ranks; {who}; ending the job, a rerun resumes from the last checkpoint "
                  "(HVD_SPARSE_COLLECTIVE_TIMEOUT sets the limit)", file=sys.stderr, flush=True)
            os._exit(1)


@contextmanager
def waiting(name: str, patience: float = 1.0) -> Iterator[None]:
    """Time this rank's wait in a collective for the watchdog (started on first use); the wait may
    last ``patience`` times the timeout."""
    global _watchdog, _entered
    timeout = collective_timeout()
    if timeout > 0 and _watchdog is None and size() > 1:
        _watchdog = threading.Thread(target=_watch, args=(timeout,), name="hvd_sparse-watchdog", daemon=True)
        _watchdog.start()
    with _waiting_lock:
        _entered += 1
        _waiting.append((name, time.monotonic(), timeout * patience))
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the engine's word for a peer that left, in ours
        if not isinstance(e, PeerFailure) and _engine().peer_failed(e):
            raise PeerFailure(str(e)) from e
        raise
    finally:
        with _waiting_lock:
            _waiting.pop()


GaveUp = engines.GaveUp  # ``world_gather`` stopped waiting for the other groups because ``give_up()`` said so


def world_gather(obj: T, give_up: Callable[[], bool] = lambda: False, poll_s: float = 0.2) -> list[T] | None:
    """Every rank's ``obj`` on world rank 0 (None elsewhere), once all groups got here.

    A group that is done early waits here sleeping, not in MPI's busy poll, so its cores go to
    the groups still training; it raises GaveUp if ``give_up()`` turns true meanwhile (a stop
    signal: the other groups checkpoint and end, and would never come).
    """
    if not _packed():
        return [obj] if is_root() else None
    with waiting_for_the_world("the end of the study"):
        return _engine().world_gather_when_all_arrive(obj, give_up, poll_s)


# -- the world's watchdog, for packed jobs ---------------------------------------------------------
#
# The watchdog above works within a group, and a group of one rank has no collective to wait in: a
# rank of a packed job that freezes while it trains is noticed by nobody, and the other groups, once
# their trials are done, wait for it in the study's final gather for ever (found by the chaos
# campaign). So every rank of a packed job also beats on a second beacon, across the whole world,
# from a thread of its own (it trains meanwhile), and a rank that waits in a world collective longer
# than the collective timeout while a rank of the world has been silent for as long ends the job with
# one line naming it. A frozen group is thus found once the others have nothing left to do.

_world_wait: tuple[str, float] | None = None  # the world collective this rank waits in, since when (monotonic)


@contextmanager
def waiting_for_the_world(name: str) -> Iterator[None]:
    global _world_wait
    _world_wait = (name, time.monotonic())
    try:
        yield
    finally:
        _world_wait = None


def _start_world_watch() -> None:
    world, me = size() * _group[1], _engine().world_rank()
    beacon = _connected_beacon(me, world, lambda obj, step: _engine().world_allgather(obj))
    threading.Thread(target=_watch_the_world, args=(beacon, collective_timeout()), name="hvd_sparse-world-watchdog",
                     daemon=True).start()


def _watch_the_world(beacon: Beacon, timeout: float) -> None:
    poll = _poll(timeout or 300.0)
    last = time.monotonic()
    seen, stops = None, 0.0  # the wait last looked at, and how long this process was stopped during it
    while True:
        time.sleep(poll)
        now = time.monotonic()
        current = _world_wait  # only the main thread writes it: a new tuple for every wait
        if current is not seen:
            seen, stops = current, 0.0
        stopped = _own_stop(beacon, now - last, poll)
        if current is not None:
            stops += stopped
        last = now
        beacon.beat(0, current is not None, now)
        if current is None or timeout <= 0 or now - current[1] - stops <= timeout:
            continue
        silent = beacon.silent_for(timeout, now)
        if silent:
            print(f"{program}: error: world rank {beacon.rank} of this packed job waited {timeout:g} s in "
                  f"{current[0]!r} for the other groups; {silent}; ending the job, a rerun resumes from the last "
                  "checkpoint (HVD_SPARSE_COLLECTIVE_TIMEOUT sets the limit)", file=sys.stderr, flush=True)
            os._exit(1)


def leave_failed(code: int) -> int:
    """The exit of a rank that failed (its line printed). In a packed job it leaves at once, without
    the interpreter's teardown: there MPI_Finalize waits for every rank of the world, and the other
    groups, training or waiting in the study's final gather, would never come (the job hung, found by
    the chaos campaign); a rank gone without it makes the launcher end the job."""
    if _packed():
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Leave the process at once, its logging and output flushed, without the interpreter's teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_barrier(timeout: float = 10.0) -> None:
    """Wait (at most ``timeout`` s) until every rank has reached this point, then return.

    Called on the way out of an error that every rank hit (bad configuration, agreed failure):
    without it, the launcher kills the slower ranks as soon as the first one exits non-zero,
    before they could print their own error line. Bounded, so a lone failing rank cannot hang.
    """
    try:
        engine = _engine()
        engine.ensure_initialized()
        if engine.size() == 1:
            return
    except Exception:  # noqa: BLE001 - best effort on the way out
        return

    def wait() -> None:
        try:
            engine.barrier()
        except Exception:  # noqa: BLE001 - Horovod shut down: the other ranks learn it now, let them say so
            time.sleep(1.0)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout)


def finish() -> None:
    """The end of a command that every rank completed: wait until all ranks of the job are here, then
    close the engine's connections (torch.distributed: the process group), so that no rank tears its
    connections down while a slower one still reads from them. Once seen without it, in CI: rank 0 of
    a torchrun job that had printed its result aborted at exit ("terminate called without an active
    exception"). Best effort: the command's work is done and written."""
    if _e is None or not _e.is_initialized():
        return
    try:
        with waiting("finish"):
            _e.finish()
    except Exception:  # noqa: BLE001 - a rank already gone: it said why itself
        pass
    _watch_the_exit()


EXIT = "the job's exit"


def _watch_the_exit() -> None:
    """From here to the end of the process the watchdogs time this rank as waiting: Horovod's atexit
    hook ends in MPI_Finalize, which waits for every rank of the world, so a rank frozen or lost on its
    way out (as the job stopped after a signal, found by the chaos campaign) hung the others there for
    ever; now they end the job after the collective timeout."""
    global _world_wait
    now = time.monotonic()
    with _waiting_lock:
        _waiting.append((EXIT, now, collective_timeout()))
    if _packed():
        _world_wait = (EXIT, now)


def leave(code: int) -> int:
    """The exit of a command that every rank completed (after ``finish``): a rank of a torch.distributed
    job leaves at once (``os._exit``, its output flushed), without the interpreter's teardown, where a
    library thread's destructor was seen to abort rank 0 of a torchrun job that had written and printed
    everything ("terminate called without an active exception", exit -6, in CI under load, after
    ``finish`` had closed the process group). Horovod's ranks exit normally: its atexit hook shuts MPI
    down, which the launcher expects."""
    if _e is not None and _e.name == "torch" and engines.has_rendezvous():
        _exit_now(code)
    return code


def rank() -> int:
    return _e.rank() if _e is not None else 0


def size() -> int:
    return _e.size() if _e is not None else 1


def local_rank() -> int:
    """This process's rank among the job's ranks on its node (across groups when packed): picks its GPU."""
    return _node[0]


def placement() -> list[dict[str, Any]]:
    """Where each rank of the job (of its group, when packed) runs, in rank order: its host, its rank
    among the job's ranks on that host and their number, its torch threads. One allgather."""
    here = {"host": socket.gethostname(), "local_rank": _node[0], "local_size": _node[1],
            "threads": torch.get_num_threads()}
    return allgather_object(here, "placement")


def is_root() -> bool:
    return rank() == 0


def horovod_version() -> str:
    """Horovod's version where it is the engine ('' on torch.distributed), for the log."""
    return _engine().version


def allreduce_sum(t: torch.Tensor, name: str) -> torch.Tensor:
    with waiting(name):
        return _engine().allreduce(t, average=False, name=name)


def allreduce_mean(t: torch.Tensor, name: str) -> torch.Tensor:
    with waiting(name):
        return _engine().allreduce(t, average=True, name=name)


def any_rank(flag: bool, name: str) -> bool:
    """Whether ``flag`` is set on any rank (one one-element allreduce)."""
    return bool(allreduce_sum(torch.tensor([1 if flag else 0], dtype=torch.int32), name).item())


def allgather_object(obj: Any, name: str, patience: float = 1.0) -> list[Any]:
    with waiting(name, patience):
        return _engine().allgather_object(obj, name)


def broadcast_object(obj: Any, name: str, root: int = 0) -> Any:
    with waiting(name):
        return _engine().broadcast_object(obj, root, name)


def agree(step: Callable[[], T], what: str) -> T:
    """Run ``step`` on every rank; if it raised anywhere, raise on every rank.

    A rank's own exception is re-raised as is (so user errors keep their type); ranks that
    succeeded raise DistributedError naming the failed rank and its message, a PeerInputError (also
    a ValueError) when that rank's error was an input error, so that every rank exits alike.
    """
    result: Any = None
    error: BaseException | None = None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001 - re-raised below on this rank
        error = e
    report = None if error is None else (isinstance(error, ValueError), f"{type(error).__name__}: {error}")
    # the ranks that are done wait here for the others' step: rank 0's SNIP or files, in ``on_root``
    reports = allgather_object(report, name=f"agree.{what}", patience=AGREE_PATIENCE)
    if error is not None:
        raise error
    for r, other in enumerate(reports):
        if other is not None:
            is_input, text = other
            raise (PeerInputError if is_input else DistributedError)(f"{what} failed on rank {r}: {text}")
    return result


def on_root(work: Callable[[], T], what: str) -> T | None:
    """The one way to do rank 0's work (files, SNIP, decisions): ``work()`` runs on rank 0 only and
    its result is returned there (None elsewhere); a failure is raised on every rank, as with ``agree``."""
    return agree(lambda: work() if is_root() else None, what)


def root_decides(decide: Callable[[], T], what: str) -> T:
    """``on_root(decide)``, whose answer (a small picklable value) is then returned on every rank."""
    return broadcast_object(on_root(decide, what), name=f"decide.{what}")


def broadcast_parameters(model: nn.Module) -> None:
    with waiting("parameters.broadcast"):
        _engine().broadcast_parameters(model)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    with waiting("optimizer_state.broadcast"):
        _engine().broadcast_optimizer_state(optimizer)


def broadcast_mask(mask: Mask | None, template: Mask) -> Mask:
    """Rank 0's mask, on every rank, in one broadcast; then every rank's checksum is compared."""
    flat = mask.to_flat() if is_root() and mask is not None else template.to_flat().zero_()
    with waiting("mask.broadcast"):
        flat = _engine().broadcast(flat, name="mask.broadcast")
    received = template.from_flat(flat)
    verify_same_everywhere(received.sha256(), "mask checksum")
    return received


def _require_same(values: list[str], what: str) -> None:
    """DistributedError unless all ranks' values are equal; it shows each rank's value, whole when
    short (a spec hash with its shard), else its first 16 characters."""
    if len(set(values)) != 1:
        detail = ", ".join(f"rank {r}: {v if len(v) <= 48 else v[:16]}" for r, v in enumerate(values))
        raise DistributedError(f"ranks disagree on the {what} ({detail})")


def verify_same_everywhere(value: str, what: str) -> None:
    _require_same(allgather_object(value, name=f"verify.{what}"), what)


def distributed_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, fp16: bool) -> Any:
    """Horovod's DistributedOptimizer around ``optimizer`` (``gradsync.TensorwiseAverage``)."""
    return _engine().distributed_optimizer(optimizer, model, fp16)

