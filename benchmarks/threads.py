"""ms per step at np=2 by torch intra-op threads per rank: hvd_sparse's default vs torch's.

    python benchmarks/threads.py [--batch-size 64] [--repeats 2]

hvd_sparse.dist.init() gives each rank (cores / ranks on the node) threads unless OMP_NUM_THREADS is
set; torch's own default is every core in every process, which at np=2 puts two busy threads per
core. Same run as step_overhead.py's hvd_sparse line (real CLI, Simple-CNN, sparsity 0.9, kept-entries
allreduce), with OMP_NUM_THREADS unset (the default), =1, =2 (torch's default here) and =4, interleaved.
"""
from __future__ import annotations

import argparse

from common import CORES, ENV, interleaved, medians, ms_per_step

SETTINGS = {"hvd_sparse default (unset)": None, "OMP_NUM_THREADS=1": "1", "OMP_NUM_THREADS=2 (torch default)": "2",
            "OMP_NUM_THREADS=4": "4"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    unset = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    med = medians(interleaved({
        name: (lambda value=value: ms_per_step(env=unset if value is None else {**unset, "OMP_NUM_THREADS": value},
                                              batch_size=args.batch_size, grad_compression="kept"))
        for name, value in SETTINGS.items()
    }, args.repeats))
    base = med["hvd_sparse default (unset)"]
    print(f"ms per step, np=2, global batch {args.batch_size}, {CORES} cores, median of {args.repeats}")
    print(f"{'threads per rank':<36} {'ms/step':>8} {'vs default':>11}")
    for name, value in med.items():
        print(f"{name:<36} {value:8.1f} {value / base:10.2f}x")


if __name__ == "__main__":
    main()
