"""ms per training step: hvd_sparse vs a bare Horovod loop, DDP + torch.nn.utils.prune, and compute only.

    python benchmarks/step_overhead.py [--batch-size 64] [--repeats 2]

All at np=2 on this machine (compute only: one process at half the batch, no communication, the
limit no data-parallel loop can beat), Simple-CNN on the bundled digits, 90% sparsity for the
pruned loops, Nesterov, the same torch threads per rank. hvd_sparse runs through its real CLI
(horovodrun ... -m hvd_sparse.train): the figure is the wall time between its logged evaluations at
steps 200 and 400 over 200, so it includes everything a user's run pays per step (masking, the
stop-signal check every 10 steps, the evaluation at step 400 of the 500 validation digits). The peers
(benchmarks/peers.py) time 200 steps after 20 of warm-up. Variants are interleaved, each repeat runs
them all once, and the median is printed with the ratios the goals are stated in. The bare loop runs
twice: as Horovod's example is (Horovod's and Open MPI's defaults), and with the launch defaults
hvd_sparse's dist.init() sets (dist.LAUNCH_DEFAULTS), so the toolkit's own cost shows apart.
"""
from __future__ import annotations

import argparse

from common import CORES, ENV, interleaved, medians, ms_per_step, peer_ms

from hvd_sparse.dist import LAUNCH_DEFAULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    b = args.batch_size
    times = interleaved({
        "hvd_sparse, kept entries": lambda: ms_per_step(batch_size=b, grad_compression="kept"),
        "hvd_sparse, none (dense)": lambda: ms_per_step(batch_size=b, grad_compression="none"),
        "bare Horovod loop": lambda: peer_ms("horovod", b),
        "bare loop + launch defaults": lambda: peer_ms("horovod", b, {**ENV, **LAUNCH_DEFAULTS}),
        "DDP (gloo) + prune": lambda: peer_ms("ddp-prune", b),
        "compute only (np=1, B/2)": lambda: peer_ms("compute", b),
    }, args.repeats)
    med = medians(times)
    bare, ddp, compute = med["bare Horovod loop"], med["DDP (gloo) + prune"], med["compute only (np=1, B/2)"]
    print(f"ms per step, np=2, global batch {b}, Simple-CNN mnist5k, median of {args.repeats} "
          f"interleaved runs ({CORES} cores)")
    print(f"{'loop':<28} {'ms/step':>8} {'runs':>16} {'/bare hvd':>10} {'/DDP+prune':>11} {'/compute':>9}")
    for name, value in med.items():
        runs = ",".join(f"{t:.1f}" for t in times[name])
        print(f"{name:<28} {value:8.1f} {runs:>16} {value / bare:10.2f} {value / ddp:11.2f} {value / compute:9.2f}")


if __name__ == "__main__":
    main()
