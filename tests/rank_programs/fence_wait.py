"""How long each rank waits in MPI_Finalize while the ranks of the last node arrive SLEEP seconds late.

argv: SLEEP. Open MPI ends MPI_Init and MPI_Finalize with a PMIx fence that carries no data, and relies
on it as a barrier across nodes; under srun --mpi=pmix the launcher's PMIx plugin runs that fence.
Every rank prints one line: ``rank R on HOST waited W s in MPI_Finalize``.
"""
import socket
import sys
import time

from mpi4py import MPI

late = float(sys.argv[1])
world = MPI.COMM_WORLD
rank, host = world.Get_rank(), socket.gethostname()
hosts = world.allgather(host)
world.Barrier()
if host == hosts[-1]:
    time.sleep(late)
start = time.monotonic()
MPI.Finalize()
print(f"rank {rank} on {host} waited {time.monotonic() - start:.1f} s in MPI_Finalize", flush=True)
