"""The two distributed engines behind ``dist``: Horovod (over MPI or Gloo) and torch.distributed (Gloo
on CPUs, NCCL on GPUs). The only module that imports either; ``dist`` holds the one in use.

Both give the same primitives with the same arithmetic: an average is a sum followed by a multiply
by 1/size (Horovod's postscale), so np=2 on one engine measures what np=2 on the other does.

Which engine: ``choose`` reads how the job was launched. torchrun (or any torch rendezvous: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) -> torch; horovodrun, mpirun, ``srun --mpi=pmix`` -> Horovod.
A request that does not fit the launch is one line, never a job of one-rank jobs.
"""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import time
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

BACKENDS = ("auto", "horovod", "torch")
TORCH_RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_LAUNCH = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "HOROVOD_RANK")


class GaveUp(Exception):
    """A wait for the other groups of a packed job stopped because ``give_up()`` said so."""


def has_rendezvous(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether torch.distributed's env:// rendezvous is set (torchrun, launch/torch-env)."""
    return all(k in environ for k in TORCH_RENDEZVOUS)


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


def choose(requested: str, environ: Mapping[str, str] = os.environ) -> str:
    """The engine for ``--backend requested`` in a process launched with ``environ``; ValueError (one
    line) when the request cannot work under that launch."""
    if requested not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    rendezvous = has_rendezvous(environ)
    mpi = [k for k in MPI_LAUNCH if k in environ]
    if requested == "auto":
        if rendezvous:
            return "torch"
        return "horovod" if mpi or horovod_available() else "torch"
    if requested == "torch" and not rendezvous and mpi:
        raise ValueError(f"--backend torch needs torch.distributed's rendezvous ({', '.join(TORCH_RENDEZVOUS)}: "
                         f"torchrun sets them), but this process was started by an MPI launcher ({mpi[0]} is set): "
                         "launch with torchrun, or use --backend horovod")
    if requested == "horovod" and rendezvous and not mpi and int(environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--backend horovod under torchrun: each process would be a Horovod job of one rank; "
                         "launch with horovodrun or mpirun, or use --backend torch")
    if requested == "horovod" and not horovod_available():
        raise ValueError("--backend horovod: Horovod is not installed here (launch/setup.sh builds it); "
                         "launch with torchrun and --backend torch")
    return requested


class Collectives(Protocol):
    """What ``dist`` needs of an engine; ``Horovod`` and ``Torch`` are its two implementations. Every
    method but the first four is a collective: all ranks of the group call it, in the same order."""

    name: str
    version: str  # the engine's version for the log ('' where it is torch.distributed itself)

    def init(self, groups: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Start; ((rank, size) among the job's ranks on this node, (group, groups))."""

    def is_initialized(self) -> bool: ...

    def ensure_initialized(self) -> None: ...

    def peer_failed(self, e: BaseException) -> bool:
        """Whether ``e`` is this engine's word for a rank that left."""

    def rank(self) -> int: ...

    def size(self) -> int: ...

    def allreduce(self, t: torch.Tensor, average: bool, name: str) -> torch.Tensor: ...

    def allgather_object(self, obj: Any, name: str) -> list[Any]: ...

    def broadcast_object(self, obj: Any, root: int, name: str) -> Any: ...

    def broadcast(self, t: torch.Tensor, name: str) -> torch.Tensor: ...

    def broadcast_parameters(self, model: nn.Module) -> None: ...

    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None: ...

    def barrier(self) -> None: ...

    def finish(self) -> None: ...

    def distributed_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, fp16: bool) -> Any: ...

    def world_rank(self) -> int: ...

    def world_allgather(self, value: Any) -> list[Any]: ...

    def world_gather_when_all_arrive(self, obj: Any, give_up: Callable[[], bool], poll_s: float) -> list[Any] | None: ...


class Horovod:
    """Horovod's collectives; ``groups`` > 1 splits the MPI world (mpi4py) into that many Horovod jobs."""

    name = "horovod"

    def __init__(self) -> None:
        import horovod
        import horovod.torch as hvd
        from horovod.common.exceptions import HorovodInternalError

        self.hvd, self.version = hvd, horovod.__version__
        self.peer_errors: tuple[type[BaseException], ...] = (HorovodInternalError,)
        self.world: Any = None  # the mpi4py world communicator when packed

    def peer_failed(self, e: BaseException) -> bool:
        """Whether ``e`` is Horovod's word for a rank that left (its collectives shut down)."""
        return isinstance(e, self.peer_errors)

    def init(self, groups: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((rank, size) on this node across the job, (group, groups))."""
        hvd = self.hvd
        if groups == 1:
            hvd.init()
            return (hvd.local_rank(), hvd.local_size()), (0, 1)
        world = self._mpi_world(groups)
        size, rank = world.Get_size(), world.Get_rank()
        group = rank // (size // groups)
        hvd.init(comm=world.Split(group, rank))
        node = world.Split_type(_mpi().COMM_TYPE_SHARED, key=rank)
        self.world = world
        return (node.Get_rank(), node.Get_size()), (group, groups)

    def _mpi_world(self, groups: int) -> Any:
        if not self.hvd.mpi_built():
            raise ValueError("--pack needs Horovod built with MPI (HOROVOD_WITH_MPI=1); this one has Gloo only")
        world = _mpi().COMM_WORLD
        if world.Get_size() % groups:
            hint = " (launched with Gloo? packing needs an MPI launch: horovodrun without --gloo, mpirun, srun --mpi=pmix)" \
                if world.Get_size() == 1 else ""
            raise ValueError(f"--pack {groups}: the MPI world of {world.Get_size()} ranks does not split into {groups} "
                             f"equal groups{hint}")
        return world

    def is_initialized(self) -> bool:
        return self.hvd.is_initialized()

    def ensure_initialized(self) -> None:
        if not self.hvd.is_initialized():
            self.hvd.init()

    def rank(self) -> int:
        return self.hvd.rank()

    def size(self) -> int:
        return self.hvd.size()

    def allreduce(self, t: torch.Tensor, average: bool, name: str) -> torch.Tensor:
        return self.hvd.allreduce(t, op=self.hvd.Average if average else self.hvd.Sum, name=name)

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        return self.hvd.allgather_object(obj, name=name)

    def broadcast_object(self, obj: Any, root: int, name: str) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=root, name=name)

    def broadcast(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return self.hvd.broadcast(t, root_rank=0, name=name)

    def broadcast_parameters(self, model: nn.Module) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def barrier(self) -> None:
        self.hvd.barrier()

    def finish(self) -> None:
        """Nothing to close: Horovod shuts itself down at exit (its own atexit hook)."""

    def distributed_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, fp16: bool) -> Any:
        """Horovod's optimizer: one allreduce per gradient, fused, overlapped with backward."""
        hvd = self.hvd
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Average,
                                        compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none)

    # the world of a packed job (None when not packed)
    def world_rank(self) -> int:
        return self.world.Get_rank()

    def world_allgather(self, value: Any) -> list[Any]:
        return self.world.allgather(value)

    def world_gather_when_all_arrive(self, obj: Any, give_up: Callable[[], bool], poll_s: float) -> list[Any] | None:
        request = self.world.Ibarrier()
        while not request.Test():
            if give_up():
                raise GaveUp("gave up waiting for the other groups")
            time.sleep(poll_s)
        return self.world.gather(obj, root=0)


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"--pack needs mpi4py ({e}); pip install mpi4py") from None
    return MPI


class Torch:
    """torch.distributed with the env:// rendezvous (torchrun): Gloo on CPUs, NCCL where ranks have GPUs.
    ``groups`` > 1 makes one process group per group of consecutive ranks. A process started alone
    (no rendezvous) is a job of one rank and needs no process group."""

    name = "torch"

    def __init__(self) -> None:
        import torch.distributed as td

        self.td, self.version = td, ""
        self.peer_errors = tuple(getattr(td, n) for n in ("DistBackendError", "DistNetworkError") if hasattr(td, n))
        self.group: Any = None  # this rank's process group (None: the world)
        self.packed = False
        self.nccl = False

    # Gloo's TCP transport reports a peer that went away as a plain RuntimeError (seen with a rank on
    # another host killed: "gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.213.0.2]:6785").
    GLOO_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")

    def peer_failed(self, e: BaseException) -> bool:
        """Whether ``e`` is torch.distributed's word for a rank that left."""
        return isinstance(e, self.peer_errors) or (
            isinstance(e, RuntimeError) and "gloo" in str(e) and any(m in str(e) for m in self.GLOO_PEER_GONE))

    def init(self, groups: int) -> tuple[tuple[int, int], tuple[int, int]]:
        td = self.td
        if not has_rendezvous():
            if groups != 1:
                raise ValueError(f"--pack {groups}: a job of one process does not split into {groups} groups")
            return (0, 1), (0, 1)
        self.nccl = torch.cuda.is_available() and os.environ.get("HVD_SPARSE_TORCH_BACKEND", "") != "gloo"
        if self.nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        # the process group's own timeout backs up the watchdog (dist.waiting), which ends a hung wait first
        td.init_process_group("nccl" if self.nccl else "gloo", init_method="env://",
                              timeout=datetime.timedelta(hours=2))
        atexit.register(self._leave)
        world_size, world_rank = td.get_world_size(), td.get_rank()
        if world_size % groups:
            raise ValueError(f"--pack {groups}: the world of {world_size} ranks does not split into {groups} equal groups")
        hosts = [None] * world_size
        td.all_gather_object(hosts, socket.gethostname())
        node = (hosts[:world_rank].count(hosts[world_rank]), hosts.count(hosts[world_rank]))
        per = world_size // groups
        if groups > 1:  # every rank creates every group, in the same order
            made = [td.new_group(list(range(g * per, (g + 1) * per))) for g in range(groups)]
            self.group, self.packed = made[world_rank // per], True
        return node, (world_rank // per, groups)

    def _leave(self) -> None:
        """At exit: close the process group, so that no transport thread outlives the interpreter
        (one that finds its peer gone while Python shuts down aborts the process)."""
        try:
            if self.td.is_initialized():
                self.td.destroy_process_group()
        except Exception:  # noqa: BLE001 - on the way out, a peer may be gone already
            pass

    def finish(self) -> None:
        """Every rank of the world meets, then each closes its process groups (``dist.finish``)."""
        self.td.barrier()
        self._leave()

    def is_initialized(self) -> bool:
        return self.td.is_initialized()

    def ensure_initialized(self) -> None:
        if not self.td.is_initialized() and has_rendezvous():
            self.init(1)

    def rank(self) -> int:
        return self.td.get_rank(self.group) if self.td.is_initialized() else 0

    def size(self) -> int:
        return self.td.get_world_size(self.group) if self.td.is_initialized() else 1

    def _root(self) -> int:
        """The global rank of this group's rank 0."""
        return self.td.get_global_rank(self.group, 0) if self.group is not None else 0

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """A copy on the device the backend sends from."""
        return t.detach().to("cuda", copy=True) if self.nccl else t.detach().clone()

    def allreduce(self, t: torch.Tensor, average: bool, name: str) -> torch.Tensor:
        if self.size() == 1:
            return t.clone()
        out = self._wire(t)
        self.td.all_reduce(out, op=self.td.ReduceOp.SUM, group=self.group)
        if average:
            out.mul_(1.0 / self.size())
        return out.to(t.device)

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        if self.size() == 1:
            return [obj]
        out = [None] * self.size()
        self.td.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, root: int, name: str) -> Any:
        if self.size() == 1:
            return obj
        box = [obj]
        src = self.td.get_global_rank(self.group, root) if self.group is not None else root
        self.td.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def broadcast(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if self.size() == 1:
            return t
        out = self._wire(t)
        self.td.broadcast(out, src=self._root(), group=self.group)
        return out.to(t.device)

    def broadcast_parameters(self, model: nn.Module) -> None:
        if self.size() == 1:
            return
        with torch.no_grad():
            for value in model.state_dict().values():
                value.copy_(self.broadcast(value, "parameters"))

    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        if self.size() == 1:
            return
        state = self.broadcast_object(optimizer.state_dict() if self.rank() == 0 else None, 0, "optimizer_state")
        if self.rank() != 0:
            optimizer.load_state_dict(state)

    def barrier(self) -> None:
        if self.size() > 1:
            self.td.barrier(group=self.group)

    def distributed_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, fp16: bool) -> Any:
        """None here: on torch.distributed every dense average is ``gradsync.FlatAverage``."""
        raise NotImplementedError("torch.distributed averages gradients through gradsync.FlatAverage")

    def world_rank(self) -> int:
        return self.td.get_rank()

    def world_allgather(self, value: Any) -> list[Any]:
        out = [None] * self.td.get_world_size()
        self.td.all_gather_object(out, value)
        return out

    def world_gather_when_all_arrive(self, obj: Any, give_up: Callable[[], bool], poll_s: float) -> list[Any] | None:
        work = self.td.barrier(async_op=True)
        while not work.is_completed():
            if give_up():
                raise GaveUp("gave up waiting for the other groups")
            time.sleep(poll_s)
        work.wait()
        out = [None] * self.td.get_world_size() if self.td.get_rank() == 0 else None
        self.td.gather_object(obj, out, dst=0)
        return out


def make(name: str) -> Collectives:
    return Horovod() if name == "horovod" else Torch()
