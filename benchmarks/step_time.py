"""Seconds per 100 training steps for each workload, at np=1 and np=2, through the real CLI.

    python benchmarks/step_time.py [--batch-size 128]

Each run is `horovodrun -np N python -m hvd_sparse.train ...` (momentum, lr 0.01, sparsity 0.9) with
--eval-every 100; the figure is the wall time between the evaluations at steps 100 and 200 read back
from the HDF5 log, so it covers 100 steps plus one evaluation of the validation split, and excludes
start-up and SNIP.
"""
from __future__ import annotations

import argparse

from common import train_window

WORKLOADS = [
    ("mnist5k", "simple-cnn"),
    ("mnist5k", "lenet5"),
    ("mnist5k", "lenet-300-100"),
    ("synthetic-cifar", "resnet8"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    print(f"seconds per 100 steps, global batch {args.batch_size}, sparsity 0.9")
    print(f"{'dataset':<16} {'model':<14} {'np=1':>7} {'np=2':>7} {'np=2/np=1':>10}")
    for dataset, model in WORKLOADS:
        times = [train_window(np_, 100, 200, dataset=dataset, model=model, optimizer="momentum",
                              batch_size=args.batch_size) for np_ in (1, 2)]
        print(f"{dataset:<16} {model:<14} {times[0]:7.2f} {times[1]:7.2f} {times[1] / times[0]:10.2f}", flush=True)


if __name__ == "__main__":
    main()
